#!/usr/bin/env python3
"""The official `openai` client against a running `fulcrum mock-backend`.

Usage: python3 tests/python/openai_stream.py BASE_URL   (for example http://127.0.0.1:8000)

Streams a chat completion and reads it back whole, checks it against the non-streaming answer
with the same seed, streams a text completion, lists models and asks for embeddings (the client
asks for base64 by default). If `prometheus_client` is installed, /metrics is parsed with it too.

Exit status: 0 when every check passes, 1 when one fails, 77 when the `openai` package is
missing (the caller decides whether that is a skip or a failure).
"""

import signal
import sys
import urllib.request

SKIP = 77
MODEL = "mock-llm"


def main(base_url: str) -> int:
    try:
        import openai
    except ImportError as e:
        print(f"SKIP: the openai package is not installed ({e}); pip install openai", flush=True)
        return SKIP

    signal.alarm(60)  # never hang a test run
    client = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="not-needed", timeout=30, max_retries=0)

    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about load balancing."}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, seed=42, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage, role = [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            role = role or choice.delta.role
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert role == "assistant", role
    assert len(pieces) == 24, f"{len(pieces)} content chunks"
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 24, usage
    assert usage.prompt_tokens > 0, usage

    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, seed=42)
    assert whole.choices[0].message.content == streamed, (whole.choices[0].message.content, streamed)
    assert whole.usage.completion_tokens == 24

    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True)
        if c.choices
    )
    assert len(text.split()) >= 1, text

    emb = client.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb

    try:
        openai_error = None
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    except openai.NotFoundError as e:
        openai_error = e
    assert openai_error is not None, "an unknown model must raise NotFoundError"

    metrics_note = "prometheus_client not installed: /metrics not parsed here"
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        pass
    else:
        page = urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=10).read().decode()
        names = {f.name for f in text_string_to_metric_families(page)}
        for want in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds"):
            assert want in names, (want, sorted(names))
        metrics_note = f"/metrics parsed by prometheus_client: {len(names)} families"

    print(f"openai {openai.__version__}: streamed {len(pieces)} chunks, {len(streamed)} characters; {metrics_note}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except AssertionError as e:
        print(f"FAILED: {e!r}", file=sys.stderr)
        sys.exit(1)
