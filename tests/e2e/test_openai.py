"""The official `openai` SDK against the backend directly and through tokengo (serve, split).

These tests assert structure, never wording (they also run against other backends, and some ask
for what a chat model would not do by itself, e.g. `ignore_eos`); test_answers.py checks what the
bundled model says."""

from __future__ import annotations

import math
import time

import openai
import pytest

from tests.e2e.conftest import Backend, Target

PROMPT = [{"role": "user", "content": "Count from one to twenty."}]


def test_models_list(target: Target, backend: Backend) -> None:
    models = target.openai().models.list()
    ids = [m.id for m in models.data]
    assert backend.model in ids, f"{backend.model!r} not in {ids}"
    assert all(m.object == "model" for m in models.data)


def test_chat_completion(target: Target, backend: Backend) -> None:
    r = target.openai().chat.completions.create(
        model=backend.model, messages=PROMPT, max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.id
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("length", "stop")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_stream_is_incremental(target: Target, backend: Backend) -> None:
    """Chunks must reach the SDK while the backend generates them, not all at the end.

    The CPU test backend produces ~20 tokens/s, so 32 tokens take over a second. A proxy that
    buffers the whole response delivers every chunk within a few milliseconds at the end
    (spread ~0: first check); one that buffers in blocks (2 KiB or more, ~8 events) delivers
    them in bursts (second check: no 20 ms window may hold more than a quarter of the chunks,
    which leaves room for scheduling hiccups of a few hundred ms). Assumes a backend slower than
    ~100 tokens/s, which the bundled one is on these machines."""
    max_tokens = 32
    start = time.monotonic()
    stream = target.openai().chat.completions.create(
        model=backend.model,
        messages=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # llama.cpp: always generate max_tokens
    )
    content_times: list[float] = []
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usage = None
    for chunk in stream:
        now = time.monotonic() - start
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content_times.append(now)
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    end = time.monotonic() - start

    n = len(content_times)
    assert n >= 16, f"only {n} content chunks for max_tokens={max_tokens}"
    assert "".join(pieces).strip()
    assert finish_reasons and finish_reasons[-1] in ("length", "stop")
    assert usage is not None and 0 < usage.completion_tokens <= max_tokens

    spread = content_times[-1] - content_times[0]
    timeline = ", ".join(f"{t:.3f}" for t in content_times)
    assert spread >= 0.3 * end, (
        f"content chunks arrived within {spread * 1000:.0f} ms of a {end * 1000:.0f} ms stream: "
        f"the response was buffered, not streamed. Arrival times (s): {timeline}"
    )
    window = 0.020
    burst = max(sum(1 for u in content_times if t <= u < t + window) for t in content_times)
    assert burst <= n // 4, (
        f"{burst} of {n} content chunks arrived within {window * 1000:.0f} ms: "
        f"buffered in blocks, not streamed per event. Arrival times (s): {timeline}"
    )


def test_completions(target: Target, backend: Backend) -> None:
    r = target.openai().completions.create(
        model=backend.model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion"
    assert len(r.choices) == 1
    assert r.choices[0].index == 0
    assert isinstance(r.choices[0].text, str) and r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8


def test_responses(target: Target, backend: Backend) -> None:
    r = target.openai().responses.create(
        model=backend.model, input="Hello", max_output_tokens=16, temperature=0
    )
    assert r.status == "completed"
    assert isinstance(r.output_text, str) and r.output_text.strip()
    assert r.usage is not None and r.usage.output_tokens > 0


@pytest.mark.parametrize("encoding_format", ["float", None], ids=["float", "sdk-default"])
def test_embeddings(target: Target, backend: Backend, encoding_format: str | None) -> None:
    """`sdk-default`: the SDK picks the wire format itself (base64) and decodes it."""
    inputs = ["The quick brown fox jumps over the lazy dog.", "Colorless green ideas sleep."]
    extra = {"encoding_format": encoding_format} if encoding_format else {}
    r = target.openai().embeddings.create(model=backend.model, input=inputs, **extra)
    assert r.object == "list"
    assert [d.index for d in r.data] == [0, 1]
    a, b = (d.embedding for d in r.data)
    for vec in (a, b):
        assert isinstance(vec, list) and all(isinstance(x, float) for x in vec)
        assert all(math.isfinite(x) for x in vec)
        assert any(x != 0.0 for x in vec)
    assert len(a) == len(b) > 0
    if backend.embedding_dim is not None:
        assert len(a) == backend.embedding_dim
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-4, "different inputs gave the same vector"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_backend_unreachable_is_openai_shaped_502(broken_target: Target, stream: bool) -> None:
    """Backend down (closed loopback port): a 502 with OpenAI's error shape, from tokengo.
    Streamed requests too: a failure before the first byte is a proper HTTP error."""
    client = broken_target.openai()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=stream
        )
    err = info.value
    assert err.status_code == 502, f"status {err.status_code}: {err.response.text[:500]}"
    assert err.response.headers.get("content-type", "").startswith("application/json")
    body = err.response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    inner = body["error"]
    assert {"message", "type", "code"} <= inner.keys(), body
    assert isinstance(inner["message"], str) and inner["message"], body
    assert isinstance(inner["type"], str) and inner["type"], body
    assert inner["code"] is None or isinstance(inner["code"], (str, int)), body
