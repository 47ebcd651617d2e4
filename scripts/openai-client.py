#!/usr/bin/env python3
"""Drives a running tern daemon's OpenAI-compatible API through the official
`openai` Python package, as an application would. Run by tests/openai.rs
with OPENAI_BASE_URL, OPENAI_API_KEY and TERN_MODEL set; exits non-zero on
the first difference from what OpenAI's API does."""

import os
import sys

import openai
from openai import OpenAI


def main() -> None:
    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    model = os.environ["TERN_MODEL"]

    ids = [m.id for m in client.models.list().data]
    assert model in ids, f"{model} not in {ids}"

    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Where does the river go?"},
    ]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0.7, seed=9
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant", choice
    assert isinstance(choice.message.content, str), choice
    assert choice.finish_reason in ("stop", "length"), choice
    assert whole.usage.completion_tokens > 0, whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    # Streamed: the same text, one id, the finish reason, the usage.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0.7,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, chunk_ids, finish, usage, first_role = [], set(), None, None, None
    for chunk in stream:
        chunk_ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if first_role is None:
                first_role = c.delta.role
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
    assert first_role == "assistant", first_role
    assert len(chunk_ids) == 1, chunk_ids
    assert "".join(parts) == choice.message.content, ("".join(parts), choice.message.content)
    assert finish == choice.finish_reason, (finish, choice.finish_reason)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

    # A plain completion.
    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=12, temperature=0, seed=1
    )
    assert completion.object == "text_completion", completion
    assert isinstance(completion.choices[0].text, str)

    # An error: a model that does not exist.
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("no error for a missing model")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
        assert "no-such-model" in str(e), e

    # A wrong key.
    try:
        OpenAI(api_key="wrong").models.list()
        raise AssertionError("no error for a wrong key")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e

    # A disconnect: read one chunk of a long stream, then close it (the
    # caller checks that the daemon stopped generating).
    long = client.completions.create(
        model=model, prompt="once", max_tokens=400, temperature=1.0, seed=11, stream=True
    )
    first = next(iter(long))
    assert first.choices[0].text is not None
    long.close()

    print(f"openai {openai.__version__}: models, chat (whole and streamed), completion, errors, disconnect: ok")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e!r}", file=sys.stderr)
        raise
