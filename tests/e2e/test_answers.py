"""The local model answers sensibly and stops by itself, with the server's default sampling.

Issue 19: the README's example answered gibberish that never stopped (a pretrained, not an
instruction-tuned, model). These tests ask what a new user would, through tokengo (and directly,
as a check of the tests themselves), with the official `openai` SDK and no sampling parameters:
the backend's defaults must give the answer. `max_tokens` is only a bound far above the answer's
length, so `finish_reason == "stop"` means the model ended its turn, not that it was cut off.

They assert wording, so they need the bundled model (tests/e2e/model_server.py); against another
backend (TOKENGO_TEST_BACKEND) they may fail for that reason alone."""

from __future__ import annotations

from tests.e2e.conftest import Backend, Target

# The README's example question (and that of the "Try it" text of scripts/run).
QUESTION = [
    {"role": "user", "content": "What is the capital of France? Answer in one short sentence."}
]
# The answer is one short sentence (8 tokens with the bundled model); an answer that runs on to
# this bound did not stop.
BOUND = 64


def test_factual_answer_is_right_and_stops(target: Target, backend: Backend) -> None:
    r = target.openai().chat.completions.create(
        model=backend.model, messages=QUESTION, max_tokens=BOUND
    )
    choice = r.choices[0]
    answer = choice.message.content or ""
    assert "Paris" in answer, f"wrong answer: {answer!r}"
    assert choice.finish_reason == "stop", f"did not stop by itself: {answer!r}"
    assert r.usage is not None and 0 < r.usage.completion_tokens < BOUND


def test_streamed_answer_ends_by_itself(target: Target, backend: Backend) -> None:
    stream = target.openai().chat.completions.create(
        model=backend.model,
        messages=QUESTION,
        max_tokens=BOUND,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    answer = "".join(pieces)
    assert "Paris" in answer, f"wrong answer: {answer!r}"
    assert finish_reasons == ["stop"], f"finish reasons {finish_reasons}: {answer!r}"
    assert usage is not None and 0 < usage.completion_tokens < BOUND


def test_greeting_answers_and_stops(target: Target, backend: Backend) -> None:
    """The issue's first example: it used to repeat the prompt until max_tokens."""
    r = target.openai().chat.completions.create(
        model=backend.model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=32
    )
    choice = r.choices[0]
    answer = choice.message.content or ""
    assert "hello" in answer.lower(), f"not a greeting: {answer!r}"
    assert choice.finish_reason == "stop", f"did not stop within 32 tokens: {answer!r}"
