#!/usr/bin/env python3
"""Drives `ffnskip serve` through the official `openai` Python client.

    python tests/openai_client.py BASE_URL API_KEY

BASE_URL is the API root, e.g. http://127.0.0.1:8080/v1; API_KEY is the server's --api-key
(an empty string when the server runs without one: the wrong-key check is then skipped).
Every check prints one line ("ok   NAME: detail" or "FAIL NAME: reason"); the exit status is
0 when all pass, 1 otherwise, 2 on bad usage. Only the `openai` package is used.
"""

import sys
import traceback

import openai

# One short chat turn whose greedy answer is deterministic.
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
FINISH = {"stop", "length"}


def extra(obj, name):
    """A field the OpenAI schema lacks (kept by pydantic in `model_extra`), or None."""
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return value


def check_usage(usage, max_completion, where):
    """`usage` has positive prompt tokens, 1..max_completion completion tokens, a consistent
    total and an `ffn_skip_ratio` in [0, 1]; returns that ratio."""
    assert usage is not None, f"{where}: no usage"
    assert usage.prompt_tokens > 0, f"{where}: prompt_tokens={usage.prompt_tokens}, want > 0"
    assert 1 <= usage.completion_tokens <= max_completion, (
        f"{where}: completion_tokens={usage.completion_tokens}, want 1..{max_completion}")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, (
        f"{where}: total_tokens={usage.total_tokens} != {usage.prompt_tokens} + "
        f"{usage.completion_tokens}")
    ratio = extra(usage, "ffn_skip_ratio")
    assert isinstance(ratio, (int, float)), (
        f"{where}: usage.ffn_skip_ratio missing or not a number: {ratio!r} "
        f"(usage={usage.model_dump()})")
    assert 0.0 <= ratio <= 1.0, f"{where}: ffn_skip_ratio={ratio} outside [0, 1]"
    return ratio


def same_counts(a, b, where):
    assert (a.prompt_tokens, a.completion_tokens, a.total_tokens) == (
        b.prompt_tokens, b.completion_tokens, b.total_tokens), (
        f"{where}: streamed usage {a.model_dump()} != non-streaming usage {b.model_dump()}")


def read_stream(stream, kind):
    """(text, finish reasons, usage chunk or None) of a chat ("chat") or legacy ("text")
    completion stream. Asserts the usage chunk, if any, is the last one with empty choices."""
    parts, finishes, usage, after_usage = [], [], None, 0
    for chunk in stream:
        if usage is not None:
            after_usage += 1
        if chunk.usage is not None:
            assert not chunk.choices, f"usage chunk has choices: {chunk.model_dump()}"
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.index == 0, f"choice index {choice.index}, want 0 (n is 1)"
            piece = choice.delta.content if kind == "chat" else choice.text
            if piece:
                parts.append(piece)
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
    assert after_usage == 0, f"{after_usage} chunk(s) after the usage chunk"
    return "".join(parts), finishes, usage


class Checks:
    def __init__(self, base_url, api_key):
        self.base_url = base_url
        self.api_key = api_key
        # The openai client refuses an empty key; a server without --api-key ignores it.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused",
                                    timeout=60.0, max_retries=0)
        self.model = None
        self.failed = []

    def run(self, name, fn):
        try:
            detail = fn()
        except AssertionError as e:
            self.failed.append(name)
            print(f"FAIL {name}: {e}", flush=True)
            return False
        except openai.APIStatusError as e:  # an HTTP error the check did not expect
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__} {e.status_code}: {e.body!r}", flush=True)
            return False
        except Exception as e:  # anything else fails this check only; trace to stderr
            self.failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
            return False
        print(f"ok   {name}: {detail}", flush=True)
        return True

    # --- checks; each returns a one-line detail ------------------------------------------

    def models(self):
        models = list(self.client.models.list())
        assert len(models) == 1, f"want exactly 1 model, got {[m.id for m in models]}"
        assert isinstance(models[0].id, str) and models[0].id, f"empty id: {models[0]!r}"
        self.model = models[0].id
        return f"id {self.model!r}"

    def chat(self):
        r = self.client.chat.completions.create(
            model=self.model, messages=CHAT, temperature=0, max_tokens=16)
        assert r.object == "chat.completion", f"object={r.object!r}"
        assert len(r.choices) == 1, f"{len(r.choices)} choices, want 1"
        c = r.choices[0]
        assert c.message.role == "assistant", f"role={c.message.role!r}"
        assert isinstance(c.message.content, str) and c.message.content, (
            f"content empty or not a string: {c.message.content!r}")
        assert c.finish_reason in FINISH, f"finish_reason={c.finish_reason!r}"
        ratio = check_usage(r.usage, 16, "usage")
        assert ratio == 0, f"ffn_skip_ratio={ratio} with the default policy none, want 0"
        self.chat_ref = r
        return (f"{r.usage.completion_tokens} tokens, finish {c.finish_reason}, "
                f"{c.message.content!r}")

    def chat_stream(self):
        ref = self.chat_ref
        stream = self.client.chat.completions.create(
            model=self.model, messages=CHAT, temperature=0, max_tokens=16, stream=True,
            stream_options={"include_usage": True})
        text, finishes, usage = read_stream(stream, "chat")
        want = ref.choices[0].message.content
        assert text == want, f"streamed {text!r} != non-streaming {want!r}"
        assert len(finishes) == 1, f"finish_reasons {finishes}, want exactly one"
        assert finishes[0] == ref.choices[0].finish_reason, (
            f"finish {finishes[0]!r} != non-streaming {ref.choices[0].finish_reason!r}")
        check_usage(usage, 16, "final usage chunk")
        same_counts(usage, ref.usage, "usage")
        return f"{len(text)} chars identical, finish {finishes[0]}, usage equal"

    def legacy(self):
        kw = dict(model=self.model, prompt="The capital of France is", temperature=0,
                  max_tokens=8)
        r = self.client.completions.create(**kw)
        assert r.object == "text_completion", f"object={r.object!r}"
        assert len(r.choices) == 1, f"{len(r.choices)} choices, want 1"
        want = r.choices[0].text
        assert isinstance(want, str) and want, f"text empty: {want!r}"
        assert r.choices[0].finish_reason in FINISH, f"finish={r.choices[0].finish_reason!r}"
        check_usage(r.usage, 8, "usage")
        stream = self.client.completions.create(
            **kw, stream=True, stream_options={"include_usage": True})
        text, finishes, usage = read_stream(stream, "text")
        assert text == want, f"streamed {text!r} != non-streaming {want!r}"
        assert finishes == [r.choices[0].finish_reason], (
            f"streamed finish_reasons {finishes}, want [{r.choices[0].finish_reason!r}]")
        check_usage(usage, 8, "final usage chunk")
        same_counts(usage, r.usage, "usage")
        return f"{want!r} both ways"

    def skip_adaptive(self):
        r = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=32,
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
            extra_body={"ffnskip": {"skip": "adaptive", "skip_ratio": 0.3, "warmup": 2}})
        ratio = check_usage(r.usage, 32, "usage")
        assert ratio > 0.1, f"ffn_skip_ratio={ratio} with adaptive 0.3, want > 0.1"
        return f"ffn_skip_ratio {ratio:.3f} over {r.usage.completion_tokens} tokens"

    def stop(self):
        # Greedy continuation of a counting list; "7" is reached well within 20 tokens.
        kw = dict(model=self.model, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20,
                  stop=["7"])
        r = self.client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert "7" not in text, f"stop string '7' in text {text!r}"
        assert finish == "stop", f"finish_reason={finish!r}, want 'stop'; text {text!r}"
        # Streaming must hold back a partial match and end the same way.
        s_text, s_finish, _ = read_stream(self.client.completions.create(**kw, stream=True),
                                          "text")
        assert s_text == text, f"streamed {s_text!r} != non-streaming {text!r}"
        assert s_finish == ["stop"], f"streamed finish_reasons {s_finish}, want ['stop']"
        # `stop` as a plain string rather than a list.
        r2 = self.client.completions.create(**{**kw, "stop": "6"})
        assert "6" not in r2.choices[0].text and r2.choices[0].finish_reason == "stop", (
            f"stop='6': text {r2.choices[0].text!r}, finish {r2.choices[0].finish_reason!r}")
        return f"text {text!r} (stream equal), stop='6' gives {r2.choices[0].text!r}"

    def _expect(self, exc_class, param, call):
        """Runs `call`; asserts it raises `exc_class` whose error names `param` (if given)
        and has a message. Returns a short description."""
        try:
            call()
        except exc_class as e:
            body = e.body if isinstance(e.body, dict) else {}
            assert body.get("message"), f"{exc_class.__name__} without error.message: {e.body!r}"
            if param is not None:
                assert e.param == param, f"error param {e.param!r}, want {param!r}: {e.body!r}"
            return f"{exc_class.__name__} ({e.status_code}, param {e.param!r})"
        except openai.APIStatusError as e:
            raise AssertionError(
                f"got {type(e).__name__} {e.status_code} {e.body!r}, want {exc_class.__name__}")
        raise AssertionError(f"no error raised, want {exc_class.__name__}")

    def errors(self):
        c, m = self.client.chat.completions, self.model
        out = [
            "n=2: " + self._expect(openai.BadRequestError, "n", lambda: c.create(
                model=m, messages=CHAT, max_tokens=4, n=2)),
            "model: " + self._expect(openai.NotFoundError, None, lambda: c.create(
                model="no-such-model", messages=CHAT, max_tokens=4)),
            "max_tokens=-1: " + self._expect(openai.BadRequestError, "max_tokens", lambda: c.create(
                model=m, messages=CHAT, max_tokens=-1)),
            "temperature=5: " + self._expect(openai.BadRequestError, "temperature", lambda: c.create(
                model=m, messages=CHAT, max_tokens=4, temperature=5)),
        ]
        return "; ".join(out)

    def auth(self):
        if not self.api_key:
            return "skipped (no API key given)"
        bad = openai.OpenAI(base_url=self.base_url, api_key="wrong-" + self.api_key,
                            timeout=60.0, max_retries=0)
        return "wrong key: " + self._expect(
            openai.AuthenticationError, None,
            lambda: bad.chat.completions.create(model=self.model, messages=CHAT, max_tokens=4))


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    checks = Checks(sys.argv[1].rstrip("/"), sys.argv[2])
    if not checks.run("models.list", checks.models):
        return 1  # every other check needs the model id
    if checks.run("chat", checks.chat):
        checks.run("chat stream", checks.chat_stream)
    else:
        print("FAIL chat stream: skipped, needs the non-streaming reference", flush=True)
        checks.failed.append("chat stream")
    checks.run("completions", checks.legacy)
    checks.run("ffnskip adaptive", checks.skip_adaptive)
    checks.run("stop", checks.stop)
    checks.run("errors", checks.errors)
    checks.run("auth", checks.auth)
    if checks.failed:
        print(f"{len(checks.failed)} check(s) failed: {', '.join(checks.failed)}", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
