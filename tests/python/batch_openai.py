"""The official `openai` client against Fulcrum's Batch API.

Usage: python3 batch_openai.py BASE_URL N

Uploads a file of N chat requests, creates a batch, polls it to `completed`, downloads the
output and checks that every `custom_id` is answered once, with the answer to its own
request. Also checks listing, file deletion and the errors of bad calls. Exits non-zero with
a message on the first failure.
"""

import io
import json
import sys
import time

import openai

base, n = sys.argv[1], int(sys.argv[2])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)

lines = [
    {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock-llm", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4},
    }
    for i in range(n)
]
data = "".join(json.dumps(l) + "\n" for l in lines).encode()
f = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
assert f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "batch", f
assert client.files.retrieve(f.id).filename == "requests.jsonl"

b = client.batches.create(
    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "test"}
)
assert b.status in ("validating", "in_progress"), b
assert b.metadata == {"job": "test"}, b.metadata
deadline = time.time() + 120
while b.status not in ("completed", "failed", "expired", "cancelled"):
    assert time.time() < deadline, f"batch still {b.status} after 120 s: {b.request_counts}"
    time.sleep(0.2)
    b = client.batches.retrieve(b.id)
assert b.status == "completed", b
assert b.request_counts.total == n and b.request_counts.completed == n and b.request_counts.failed == 0, b.request_counts
assert b.completed_at and b.in_progress_at and b.finalizing_at, b
assert b.error_file_id is None, b

out = client.files.content(b.output_file_id).text
seen = {}
for line in out.splitlines():
    r = json.loads(line)
    cid = r["custom_id"]
    assert cid not in seen, f"{cid} twice in the output"
    assert r["error"] is None and r["response"]["status_code"] == 200, r
    body = r["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "mock-llm", body
    seen[cid] = body
assert set(seen) == {l["custom_id"] for l in lines}, "the output does not answer every request"

page = client.batches.list(limit=1)
assert page.data[0].id == b.id, page

# Files list newest first; the output file is there under its purpose, the input under its.
outputs = [x.id for x in client.files.list(purpose="batch_output")]
assert outputs == [b.output_file_id], outputs
inputs = client.files.list(purpose="batch", order="asc", limit=1)
assert [x.id for x in inputs.data] == [f.id] and inputs.has_more is False, inputs
every = [x.id for x in client.files.list()]
assert every == [b.output_file_id, f.id], every

# Bad calls get OpenAI-shaped errors.
try:
    client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    raise AssertionError("a batch of a missing file was accepted")
except openai.NotFoundError as e:
    assert "file-missing" in str(e), e
try:
    client.batches.create(input_file_id=f.id, endpoint="/v1/nope", completion_window="24h")
    raise AssertionError("an unknown endpoint was accepted")
except openai.BadRequestError as e:
    assert "/v1/nope" in str(e), e

# A file with bad lines makes a failed batch that names each.
bad = (json.dumps(lines[0]) + "\n{oops\n" + json.dumps(lines[0]) + "\n").encode()
fb = client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
bb = client.batches.create(input_file_id=fb.id, endpoint="/v1/chat/completions", completion_window="24h")
assert bb.status == "failed", bb
codes = [(e.line, e.code) for e in bb.errors.data]
assert codes == [(2, "invalid_json_line"), (3, "duplicate_custom_id")], codes

assert client.files.delete(fb.id).deleted
try:
    client.files.retrieve(fb.id)
    raise AssertionError("a deleted file is still there")
except openai.NotFoundError:
    pass
print(f"ok: {n} requests answered once each, batch {b.id}")
