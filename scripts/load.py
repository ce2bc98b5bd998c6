#!/usr/bin/env python3
"""Load and fault test for `ffnskip serve` (driven by scripts/load.sh).

    python scripts/load.py --base http://127.0.0.1:PORT [--duration 600] [--concurrency 32]
                           [--api-key KEY] [--seed 1] [--out summary.json]

CONCURRENCY workers loop until the deadline; each request is, at random (--mix):
  85%  valid: chat or legacy completion, streaming or not, max_tokens 8..256, prompt from a
       few words to ~1500 tokens, sometimes a per-request "ffnskip" policy;
  10%  a streaming request whose client disconnects after a random number of chunks;
   5%  malformed (bad JSON, missing field, n=2, temperature=9, body over the size limit,
       unknown route or model), which must get the expected 4xx with the OpenAI error shape;
       each malformed kind is also sent once before the workers start.
429 and 503 answers count as "shed" and are retried after Retry-After. After the deadline no
new request starts; those in flight get --grace seconds, then are dropped ("unfinished").
Then /metrics must show ffnskip_active_slots 0 and ffnskip_queue_depth 0 within --settle s.

Prints a JSON summary on stdout (and to --out); failures, first few in detail, on stderr.
Exit status 1 if a valid request failed, a malformed one got an unexpected answer, or a slot
or queue entry leaked; 2 if the server could not be reached at all.
"""

import argparse
import asyncio
import json
import random
import re
import sys
import time

try:
    import httpx
except ImportError:  # newer `openai` releases depend on the `httpx2` fork instead
    import httpx2 as httpx

# Common English words: random sentences of them tokenize at roughly 1.2-1.3 tokens a word.
WORDS = """the of and to in is was for on that with as by at from his her it an were are which
this be or has had not but first one their its new after who they have two been other when
there all during into school time may years more most only over city some world would where
later up such used many can state about national out known university united then made also
league film river team war series between game season three while both number called water
house music people family church county under year part high group well life government
album until before second four end since early several south north long""".split()

# Malformed requests: (name, method, path, body bytes or a dict, expected status, expected
# error `param` or None for "any"). The huge body is built once in main().
MALFORMED = [
    ("bad_json", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user"', 400, None),
    ("missing_messages", "POST", "/v1/chat/completions", {"max_tokens": 8}, 400, "messages"),
    ("missing_prompt", "POST", "/v1/completions", {"max_tokens": 8}, 400, "prompt"),
    ("n_2", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("temperature_9", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ("max_tokens_negative", "POST", "/v1/completions",
     {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("unknown_model", "POST", "/v1/completions",
     {"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404, None),
    ("unknown_route_post", "POST", "/v1/nothing/here", {"prompt": "hi"}, 404, None),
    ("unknown_route_get", "GET", "/v1/nothing", None, 404, None),
    ("huge_body", "POST", "/v1/chat/completions", "HUGE", 413, None),
]


def percentile(xs, q):
    """The q-quantile (0..1) of xs by linear interpolation; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def num(x):
    """A metric value as an int when integral (None stays None)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def parse_metrics(text):
    """Prometheus text → {name or name{labels}: float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{.*\})?)\s+(\S+)$", line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


class Stats:
    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.shed = 0
        self.cancelled = 0
        self.malformed_ok = 0
        self.malformed_unexpected = 0
        self.unfinished = 0
        self.tokens = 0            # completion tokens of valid requests that finished ok
        self.ttft = []             # seconds, streaming valid requests
        self.kinds = {}            # request kind → count started
        self.malformed_detail = {}  # "name:ok|reset|unexpected" → count
        self.failures = []         # first descriptions, for stderr
        self.last_done = None      # time.monotonic() of the last finished request

    def succeeded(self, tokens, ttft):
        """A valid request answered in full: `tokens` generated, `ttft` s to the first (or None)."""
        self.ok += 1
        self.tokens += tokens
        if ttft is not None:
            self.ttft.append(ttft)

    def fail(self, what, counter):
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.failures) < 30:
            self.failures.append(what)


class Shed(Exception):
    """429/503: retry after `delay` seconds."""

    def __init__(self, delay):
        self.delay = delay


def retry_after(resp):
    try:
        return min(max(float(resp.headers.get("retry-after", "1")), 0.05), 10.0)
    except ValueError:
        return 1.0


def error_shape(body):
    """None if `body` (bytes) is {"error": {message: str, type: str, param, code}}, else why."""
    try:
        obj = json.loads(body)
    except ValueError:
        return f"body not JSON: {body[:120]!r}"
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return f"no error object: {body[:200]!r}"
    if not isinstance(err.get("message"), str) or not err["message"]:
        return f"error.message missing: {err!r}"
    if not isinstance(err.get("type"), str):
        return f"error.type missing: {err!r}"
    missing = [k for k in ("param", "code") if k not in err]
    if missing:
        return f"error lacks {missing}: {err!r}"
    return None


class Load:
    def __init__(self, args):
        self.args = args
        self.stats = Stats()
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        # Connect/write/pool bounded; reads wait for a queued request's first byte.
        timeout = httpx.Timeout(connect=10.0, read=args.read_timeout, write=60.0, pool=None)
        limits = httpx.Limits(max_connections=args.concurrency + 4,
                              max_keepalive_connections=args.concurrency + 4)
        self.client = httpx.AsyncClient(base_url=args.base, timeout=timeout, limits=limits,
                                        headers=self.headers, trust_env=False)
        huge_text = "a " * (args.huge_mb * 1024 * 1024 // 2)
        self.huge = json.dumps({"messages": [{"role": "user", "content": huge_text}],
                                "max_tokens": 1}).encode()
        self.deadline = 0.0
        self.model = None  # the served id, from /v1/models; half the valid requests name it
        total = sum(args.mix)
        self.mix = [x / total for x in args.mix]  # valid, cancel, malformed fractions

    # --- request bodies --------------------------------------------------------------------

    def text(self, rng):
        """Prompt text: 50% short (4-30 words), 30% medium (50-300), 20% long (300-1100,
        up to ~1500 tokens)."""
        r = rng.random()
        if r < 0.5:
            n = rng.randint(4, 30)
        elif r < 0.8:
            n = rng.randint(50, 300)
        else:
            n = rng.randint(300, 1100)
        words = [rng.choice(WORDS) for _ in range(n)]
        for i in range(0, n, 12):  # sentences of about 12 words
            words[i] = words[i].capitalize()
            if i:
                words[i - 1] += "."
        return " ".join(words) + "."

    def valid_body(self, rng, stream, chat, max_tokens=None):
        text = self.text(rng)
        body = {"max_tokens": max_tokens or int(round(2 ** rng.uniform(3, 8)))}  # 8..256
        if self.model and rng.random() < 0.5:
            body["model"] = self.model
        if chat:
            msgs = [{"role": "user", "content": "Continue this text:\n\n" + text}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
            body["messages"] = msgs
        else:
            body["prompt"] = text
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=round(rng.uniform(0.3, 1.2), 2), top_p=0.95, top_k=40,
                        min_p=0.05, seed=rng.randint(0, 2**31 - 1))
        if rng.random() < 0.1:
            body["stop"] = rng.choice(["\n\n", ["The", "."], "river"])
        p = rng.random()
        if p < 0.15:
            body["ffnskip"] = {"skip": "adaptive", "skip_ratio": 0.25}
        elif p < 0.25:
            body["ffnskip"] = {"skip": "random", "skip_ratio": 0.25}
        elif p < 0.3:
            body["ffnskip"] = {"skip": "none"}
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return body

    # --- one request of each kind; raise Shed on 429/503 ------------------------------------

    async def stream(self, path, body, prog, cancel_after=None):
        """Streams one completion. Returns ("ok", tokens, ttft_s) or ("cancelled", chunks,
        None); ("failed", why, None) for a bad answer. Notes progress in `prog`."""
        t0 = prog["t0"] = time.monotonic()
        chat = path.endswith("chat/completions")
        async with self.client.stream("POST", path, json=body) as resp:
            prog["status"] = resp.status_code
            if resp.status_code in (429, 503):
                raise Shed(retry_after(resp))
            if resp.status_code != 200:
                raw = await resp.aread()
                return "failed", f"status {resp.status_code}: {raw[:300]!r}", None
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                return "failed", f"content-type {ctype!r}", None
            chunks = 0       # content-bearing chunks
            ttft = None
            usage = None
            finishes = 0
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                prog["events"] += 1
                if done:
                    return "failed", f"data after [DONE]: {data[:200]!r}", None
                if data == "[DONE]":
                    done = prog["done"] = True
                    continue
                try:
                    obj = json.loads(data)
                except ValueError:
                    return "failed", f"chunk not JSON: {data[:200]!r}", None
                if "error" in obj:
                    return "failed", f"error chunk: {data[:300]}", None
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if piece:
                        chunks += 1
                        prog["chunks"] = chunks
                        if ttft is None:
                            ttft = time.monotonic() - t0
                    if ch.get("finish_reason") is not None:
                        finishes += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return "cancelled", chunks, None  # leaving the block drops the connection
            if not done:
                return "failed", f"stream ended without [DONE] after {chunks} chunks", None
            if finishes != 1:
                return "failed", f"{finishes} finish_reason chunks, want 1", None
            if body.get("stream_options", {}).get("include_usage"):
                if not usage:
                    return "failed", "include_usage given but no usage chunk", None
                return "ok", usage.get("completion_tokens", chunks), ttft
            return "ok", chunks, ttft

    async def plain(self, path, body, prog):
        """One non-streaming completion: ("ok", completion tokens) or ("failed", why)."""
        prog["t0"] = time.monotonic()
        resp = await self.client.post(path, json=body)
        prog["status"] = resp.status_code
        if resp.status_code in (429, 503):
            raise Shed(retry_after(resp))
        if resp.status_code != 200:
            return "failed", f"status {resp.status_code}: {resp.content[:300]!r}"
        try:
            obj = resp.json()
            choice = obj["choices"][0]
            usage = obj["usage"]
            text = choice["message"]["content"] if "chat" in path else choice["text"]
            assert isinstance(text, str), f"text {text!r}"
            assert choice["finish_reason"] in ("stop", "length"), choice["finish_reason"]
            assert usage["completion_tokens"] <= body["max_tokens"], usage
            return "ok", usage["completion_tokens"]
        except (ValueError, KeyError, IndexError, TypeError, AssertionError) as e:
            return "failed", f"bad body ({type(e).__name__} {e}): {resp.content[:300]!r}"

    async def malformed(self, rng, pick=None):
        name, method, path, body, want, param = \
            MALFORMED[pick] if pick is not None else rng.choice(MALFORMED)
        if body == "HUGE":
            body = self.huge
        content = body if isinstance(body, bytes) else None if body is None else \
            json.dumps(body).encode()
        hdr = {"Content-Type": "application/json"} if content is not None else {}
        try:
            resp = await self.client.request(method, path, content=content, headers=hdr)
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            # A server may answer 413 and close before the whole body is sent; the client
            # then sees the reset rather than the answer.
            if name == "huge_body":
                return name, "reset", None
            raise
        if resp.status_code in (429, 503):
            raise Shed(retry_after(resp))
        if resp.status_code != want:
            return name, "unexpected", f"status {resp.status_code}, want {want}: " \
                                       f"{resp.content[:200]!r}"
        why = error_shape(resp.content)
        if why:
            return name, "unexpected", why
        got = json.loads(resp.content)["error"].get("param")
        if param is not None and got != param:
            return name, "unexpected", f"error.param {got!r}, want {param!r}"
        return name, "ok", None

    # --- workers ----------------------------------------------------------------------------

    async def one(self, rng, kind=None, pick=None):
        """Starts one request (of `kind`, else drawn by --mix), retrying shed ones while time
        is left. `pick` chooses the malformed kind by index, else it is drawn."""
        s = self.stats
        r = rng.random()
        if kind is None:
            kind = "valid" if r < self.mix[0] else \
                "cancel" if r < self.mix[0] + self.mix[1] else "malformed"
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        stream = kind == "cancel" or rng.random() < 0.6
        if kind == "cancel":
            body = self.valid_body(rng, True, chat, max_tokens=rng.randint(32, 256))
            label = "cancel"
        elif kind == "valid":
            body = self.valid_body(rng, stream, chat)
            label = f"{'chat' if chat else 'text'}-{'stream' if stream else 'plain'}"
        else:
            label = "malformed"
        s.kinds[label] = s.kinds.get(label, 0) + 1
        while True:
            # How far the current attempt got, for the report of a transport error.
            prog = {"t0": time.monotonic(), "status": None, "events": 0, "chunks": 0,
                    "done": False}
            try:
                if kind == "malformed":
                    name, res, why = await self.malformed(rng, pick)
                    key = f"{name}:{res}"
                    s.malformed_detail[key] = s.malformed_detail.get(key, 0) + 1
                    if res in ("ok", "reset"):
                        s.malformed_ok += 1
                    else:
                        s.fail(f"malformed {name}: {why}", "malformed_unexpected")
                elif kind == "cancel":
                    res, val, ttft = await self.stream(path, body, prog, rng.randint(1, 24))
                    if res == "cancelled":
                        s.cancelled += 1
                    elif res == "ok":  # finished before the chosen chunk
                        s.succeeded(val, ttft)
                    else:
                        s.fail(f"{label} {path}: {val}", "failed")
                elif stream:
                    res, val, ttft = await self.stream(path, body, prog)
                    if res == "ok":
                        s.succeeded(val, ttft)
                    else:
                        s.fail(f"{label} {path}: {val}", "failed")
                else:
                    res, val = await self.plain(path, body, prog)
                    if res == "ok":
                        s.succeeded(val, None)
                    else:
                        s.fail(f"{label} {path}: {val}", "failed")
                s.last_done = time.monotonic()
                return
            except Shed as e:
                s.shed += 1
                if time.monotonic() + e.delay >= self.deadline:
                    return  # no time left to retry; shed, not failed
                await asyncio.sleep(e.delay)
            except httpx.HTTPError as e:
                counter = "malformed_unexpected" if kind == "malformed" else "failed"
                where = "" if kind == "malformed" else (
                    f" after {time.monotonic() - prog['t0']:.1f}s, status {prog['status']}, "
                    f"{prog['events']} events, {prog['chunks']} content chunks, "
                    f"[DONE] {'seen' if prog['done'] else 'not seen'}; request "
                    f"max_tokens {body['max_tokens']}, {len(json.dumps(body))} bytes")
                s.fail(f"{label} {path}: {type(e).__name__}: {e!r}{where}", counter)
                s.last_done = time.monotonic()
                return

    async def worker(self, i):
        rng = random.Random(self.args.seed * 1000 + i)
        while time.monotonic() < self.deadline:
            await self.one(rng)

    async def metrics(self):
        resp = await self.client.get("/metrics", timeout=10.0)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    async def run(self):
        a, s = self.args, self.stats
        try:
            before = await self.metrics()
            models = await self.client.get("/v1/models", timeout=10.0)
            models.raise_for_status()
            self.model = models.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            print(f"cannot query {a.base}/metrics and /v1/models: {e!r}", file=sys.stderr)
            return 2
        start = time.monotonic()
        self.deadline = start + a.duration
        # Every malformed kind once up front, so that even a short run covers them all.
        for i in range(len(MALFORMED)):
            await self.one(random.Random(), kind="malformed", pick=i)
        tasks = [asyncio.create_task(self.worker(i)) for i in range(a.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=a.duration + a.grace)
        for t in pending:  # still in flight --grace s after the deadline
            t.cancel()
        s.unfinished = len(pending)
        if pending:
            await asyncio.wait(pending, timeout=10)
        for t in done:
            if t.exception() is not None:  # a bug in this script, not the server
                s.fail(f"worker crashed: {t.exception()!r}", "failed")
        end = s.last_done or time.monotonic()

        # No slot or queue entry may outlive its request, cancelled ones included.
        after, settle_end = {}, time.monotonic() + a.settle
        while True:
            try:
                after = await self.metrics()
            except httpx.HTTPError as e:
                print(f"/metrics after the run: {e}", file=sys.stderr)
            if after.get("ffnskip_active_slots") == 0 and after.get("ffnskip_queue_depth") == 0:
                break
            if time.monotonic() >= settle_end:
                break
            await asyncio.sleep(0.5)
        await self.client.aclose()

        wall = max(end - start, 1e-9)
        gen = lambda m: m.get("ffnskip_generated_tokens_total")
        canc = lambda m: m.get("ffnskip_requests_cancelled_total")
        prompt = lambda m: m.get("ffnskip_prompt_tokens_total")
        summary = {
            "duration_s": round(wall, 1),
            "requests_ok": s.ok,
            "requests_failed": s.failed,
            "shed": s.shed,
            "cancelled": s.cancelled,
            "malformed_ok": s.malformed_ok,
            "malformed_unexpected": s.malformed_unexpected,
            "unfinished": s.unfinished,
            "ttft_p50_s": None if not s.ttft else round(percentile(s.ttft, 0.5), 3),
            "ttft_p99_s": None if not s.ttft else round(percentile(s.ttft, 0.99), 3),
            "aggregate_tok_s": round(s.tokens / wall, 2),
            "completion_tokens": s.tokens,
            "server_generated_tokens": None if gen(after) is None or gen(before) is None
            else int(gen(after) - gen(before)),
            "server_prompt_tokens": None if prompt(after) is None or prompt(before) is None
            else int(prompt(after) - prompt(before)),
            "server_cancelled": None if canc(after) is None or canc(before) is None
            else int(canc(after) - canc(before)),
            "active_slots_after": num(after.get("ffnskip_active_slots")),
            "queue_depth_after": num(after.get("ffnskip_queue_depth")),
            "kinds": dict(sorted(s.kinds.items())),
            "malformed_detail": dict(sorted(s.malformed_detail.items())),
            "concurrency": a.concurrency,
        }
        out = json.dumps(summary, indent=2)
        print(out, flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write(out + "\n")
        for what in s.failures:
            print(f"failure: {what}", file=sys.stderr)
        leaked = summary["active_slots_after"] != 0 or summary["queue_depth_after"] != 0
        if leaked:
            print(f"slot/queue leak or metric missing: active_slots="
                  f"{summary['active_slots_after']} queue_depth={summary['queue_depth_after']}",
                  file=sys.stderr)
        return 1 if s.failed or s.malformed_unexpected or leaked else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    ap.add_argument("--api-key", default="", help="Bearer token, if the server wants one")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grace", type=float, default=120,
                    help="seconds in-flight requests get after the deadline")
    ap.add_argument("--settle", type=float, default=15,
                    help="seconds for active slots and queue to drain to 0 afterwards")
    ap.add_argument("--read-timeout", type=float, default=300,
                    help="seconds to wait for the next byte of an answer")
    ap.add_argument("--huge-mb", type=int, default=3, help="size of the too-large body, MiB")
    ap.add_argument("--mix", type=lambda v: [float(x) for x in v.split(",")],
                    default=[0.85, 0.10, 0.05],
                    help="fractions valid,cancel,malformed (default 0.85,0.10,0.05)")
    ap.add_argument("--out", help="also write the JSON summary here")
    args = ap.parse_args()
    args.base = args.base.rstrip("/")
    if args.base.endswith("/v1"):
        args.base = args.base[:-3]
    return asyncio.run(Load(args).run())


if __name__ == "__main__":
    sys.exit(main())
