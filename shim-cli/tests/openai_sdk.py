"""Drives the shim's OpenAI gateway with the official OpenAI Python SDK.

Usage: python openai_sdk.py BASE_URL MODEL API_KEY
Exits non-zero (with the failing check) when the gateway does not behave as the SDK expects.
Run by shim-cli/tests/e2e_gateway.rs.
"""

import sys

import openai

base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)

# List models: the deployed one is there, with the gateway's extra fields.
models = client.models.list()
ids = [m.id for m in models.data]
assert model in ids, f"{model} not listed: {ids}"
listed = next(m for m in models.data if m.id == model)
assert getattr(listed, "status", None) == "running", listed

# A chat completion.
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=8
)
text = reply.choices[0].message.content
assert text, reply
assert reply.usage is not None and reply.usage.completion_tokens > 0, reply.usage

# A streamed chat completion: several chunks that add up to the answer.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "stream please"}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
pieces = []
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert len(pieces) > 1, pieces
assert usage is not None and usage.completion_tokens > 0, usage

# An unknown model: the SDK raises NotFoundError with the gateway's message.
try:
    client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}]
    )
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert err.status_code == 404
    assert "no-such-model" in str(err) and model in str(err), str(err)

# A wrong key: AuthenticationError.
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as err:
    assert err.status_code == 401

print("openai sdk: ok", "".join(pieces))
