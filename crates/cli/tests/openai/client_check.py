"""Drives a running `kiln serve` with the official `openai` Python client, unchanged: chat and
text completions (whole and streaming), embeddings, model listing, and the client's typed errors
for a missing model and a bad request. Prints one JSON object with what it saw; the Rust test
(`crates/cli/tests/openai_client.rs`) checks it against the server's own answers.

Usage: python client_check.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=120)
out = {}

out["models"] = [m.id for m in client.models.list().data]

question = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0)
out["chat"] = {
    "text": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens],
}

pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model="smollm2", messages=question, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens]
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = {"text": "".join(pieces), "chunks": len(pieces), "finish_reason": finish, "usage": usage}

r = client.completions.create(model="smollm2", prompt="The quick brown fox", max_tokens=12, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}
text = "".join(
    c.choices[0].text
    for c in client.completions.create(model="smollm2", prompt="The quick brown fox", max_tokens=12, temperature=0, stream=True)
    if c.choices
)
out["completion_stream"] = text

# The client asks for base64 by default and decodes it to floats.
e = client.embeddings.create(model="minilm", input=["hello world", "kiln serves embeddings"])
out["embeddings"] = [d.embedding for d in e.data]
out["embedding_usage"] = e.usage.prompt_tokens
e = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
out["embedding_float"] = e.data[0].embedding

try:
    client.chat.completions.create(model="gpt-4o", messages=question)
    out["not_found"] = "no error"
except openai.NotFoundError as err:
    out["not_found"] = {"status": err.status_code, "message": err.message}
try:
    client.chat.completions.create(model="smollm2", messages=question, temperature=5)
    out["bad_request"] = "no error"
except openai.BadRequestError as err:
    out["bad_request"] = {"status": err.status_code, "message": err.message}

print(json.dumps(out))
