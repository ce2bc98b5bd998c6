#!/usr/bin/env python3
"""Aggregate decode throughput of OpenAI-compatible servers, 1 vs N concurrent streams
(driven by scripts/serve-bench.sh, which starts the servers).

    python scripts/serve_bench.py --server ours=http://127.0.0.1:P1 \\
        [--server llama=http://127.0.0.1:P2 --llama llama] [--streams 1,8] [--reps 3] \\
        [--max-tokens 128] [--out result.md]

For each rep, server (in the order given, alternating) and stream count N: N concurrent
non-streaming POST /v1/completions, temperature 0, max_tokens; aggregate = the sum of
usage.completion_tokens / wall seconds from the first send to the last answer. Servers named
by --llama get "ignore_eos": true and "cache_prompt": false. Prompts are numbered-list
continuations with a different start per request, so greedy decoding does not stop early and
no prompt prefix is shared. Prints a markdown table (also to --out); exit 1 if a request fails.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time

try:
    import httpx
except ImportError:  # newer `openai` releases depend on the `httpx2` fork instead
    import httpx2 as httpx


def prompt(start):
    """"start, start+1, ..., start+15," — greedy continues the count."""
    return ", ".join(str(start + i) for i in range(16)) + ","


async def one(client, base, body):
    resp = await client.post(f"{base}/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"{base}: status {resp.status_code}: {resp.text[:300]}")
    usage = resp.json()["usage"]
    return usage["completion_tokens"]


async def batch(client, base, n, max_tokens, llama, seed):
    """N concurrent requests → (wall seconds, [completion tokens])."""
    bodies = []
    for i in range(n):
        body = {"prompt": prompt(1000 * seed + 37 * i + 1), "max_tokens": max_tokens,
                "temperature": 0}
        if llama:
            body.update(ignore_eos=True, cache_prompt=False)
        bodies.append(body)
    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(client, base, b) for b in bodies))
    return time.perf_counter() - t0, tokens


async def run(args):
    servers = [s.split("=", 1) for s in args.server]
    llama = set(args.llama)
    streams = [int(x) for x in args.streams.split(",")]
    # (server, n) → list of (aggregate tok/s, wall s, mean completion tokens per request)
    results = {(name, n): [] for name, _ in servers for n in streams}
    timeout = httpx.Timeout(connect=10.0, read=args.timeout, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=max(streams) + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        for name, base in servers:  # warm-up, untimed
            await batch(client, base, 1, 8, name in llama, 0)
        seed = 1
        for rep in range(args.reps):
            for name, base in servers:
                for n in streams:
                    wall, tokens = await batch(client, base, n, args.max_tokens,
                                               name in llama, seed)
                    seed += 1
                    agg = sum(tokens) / wall
                    results[(name, n)].append((agg, wall, sum(tokens) / n))
                    print(f"rep {rep + 1} {name:>6} N={n}: {sum(tokens)} tokens "
                          f"({min(tokens)}..{max(tokens)} each) in {wall:.2f}s = "
                          f"{agg:.1f} tok/s", file=sys.stderr, flush=True)
    return servers, streams, results


def table(servers, streams, results, args):
    med = lambda key, i: statistics.median(r[i] for r in results[key])
    lines = [
        f"Aggregate decode throughput, non-streaming /v1/completions, temperature 0, "
        f"max_tokens {args.max_tokens}, {args.reps} reps (median, min–max).",
        "",
        "| server | streams | aggregate tok/s | min–max | wall s | completion tokens/request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _ in servers:
        for n in streams:
            rs = results[(name, n)]
            lo, hi = min(r[0] for r in rs), max(r[0] for r in rs)
            lines.append(f"| {name} | {n} | {med((name, n), 0):.1f} | {lo:.1f}–{hi:.1f} | "
                         f"{med((name, n), 1):.2f} | {med((name, n), 2):.1f} |")
    lines.append("")
    lo_n, hi_n = min(streams), max(streams)
    for name, _ in servers:
        if lo_n != hi_n:
            r = med((name, hi_n), 0) / med((name, lo_n), 0)
            lines.append(f"- {name}: {hi_n}-stream / {lo_n}-stream = {r:.2f}×")
    if len(servers) > 1:
        a, b = servers[0][0], servers[1][0]
        for n in streams:
            r = med((a, n), 0) / med((b, n), 0)
            lines.append(f"- {a} / {b} at {n} stream{'s' if n > 1 else ''} = {r:.2f}×")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", action="append", required=True, metavar="NAME=URL",
                    help="a server root URL (repeat; the first is the ratio's numerator)")
    ap.add_argument("--llama", action="append", default=[], metavar="NAME",
                    help="servers that take llama-server's ignore_eos / cache_prompt")
    ap.add_argument("--streams", default="1,8", help="concurrent request counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=300, help="per-request read timeout, s")
    ap.add_argument("--header", default="", help="text printed above the table (commands)")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    try:
        servers, streams, results = asyncio.run(run(args))
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
        print(f"serve_bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    md = (args.header.rstrip() + "\n\n" if args.header else "") + \
        table(servers, streams, results, args)
    print(md, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
