"""Drives a running `ringlm serve` with the official OpenAI Python client (run by tests/tests/serve.rs).

usage: openai_client.py BASE_URL MODE   (MODE: smollm2 = real words, checked; yuan = random weights, shapes only)
Exits non-zero with a message on the first failed check.
"""
import concurrent.futures
import json
import sys
import time
import urllib.request

import openai

base, mode = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# Completions, whole and streamed: the same greedy text both ways, with usage.
whole = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
check(whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens >= 1, f"usage {whole.usage}")
check(whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens, "total_tokens")
check(whole.choices[0].finish_reason in ("stop", "length"), f"finish {whole.choices[0].finish_reason}")
pieces, finish = [], None
for ev in client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
                                    stream=True):
    pieces.append(ev.choices[0].text)
    finish = ev.choices[0].finish_reason or finish
check("".join(pieces) == whole.choices[0].text, f"stream {''.join(pieces)!r} vs whole {whole.choices[0].text!r}")
check(finish == whole.choices[0].finish_reason, "stream finish_reason")
if mode == "smollm2":
    check("Paris" in whole.choices[0].text, f"completion {whole.choices[0].text!r} does not name Paris")
else:
    check(whole.usage.completion_tokens == 6 or whole.choices[0].finish_reason == "stop", "max_tokens honoured")

# Chat, whole and streamed.
msgs = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
answer = chat.choices[0].message.content
check(chat.choices[0].message.role == "assistant", "role")
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, stream=True))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == answer, f"chat stream {streamed!r} vs whole {answer!r}")
check(chunks[-1].choices[0].finish_reason in ("stop", "length"), "chat stream ends with a finish_reason")
if mode == "smollm2":
    check("Paris" in answer, f"chat answer {answer!r} does not name Paris")
    check(chat.choices[0].finish_reason == "stop", "the chat answer ends at <|im_end|> within 24 tokens")

# Sampling: the same seed gives the same text; stop strings cut the text.
a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
check(a.choices[0].text == b.choices[0].text, "same seed, same text")
full = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
text = full.choices[0].text
if len(text) > 4:
    stop = text[2:4]
    cut = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                                    stop=[stop])
    check(cut.choices[0].text == text[:text.index(stop)], f"stop {stop!r}: {cut.choices[0].text!r} from {text!r}")
    check(cut.choices[0].finish_reason == "stop", "stop string gives finish_reason stop")

# A client that leaves mid-stream frees the server at once: the next request is served.
stream = client.completions.create(model=model, prompt="Tell me a long story.", max_tokens=400, temperature=0,
                                   stream=True)
for i, _ in enumerate(stream):
    if i == 2:
        break
stream.close()
t = time.time()
again = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
check(again.usage.completion_tokens >= 1, "served after a client left")
check(time.time() - t < 30, "the abandoned request kept the server busy")

# Load: 200 requests from 8 concurrent clients, none lost, none failed.
def one(i):
    r = client.completions.create(model=model, prompt=f"Number {i} is", max_tokens=3, temperature=0)
    return r.usage.completion_tokens


with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(one, range(200)))
check(len(results) == 200 and all(r >= 1 for r in results), "200 concurrent requests all answered")

with urllib.request.urlopen(base + "/health") as r:
    check(json.load(r)["status"] == "ok", "healthy at the end")
with urllib.request.urlopen(base + "/metrics") as r:
    metrics = r.read().decode()
served = [l for l in metrics.splitlines() if l.startswith("ringlm_requests_total ")]
check(served and int(served[0].split()[1]) >= 200, f"metrics count the requests: {served}")
print(f"ok: {mode}: {len(results)} load requests, answer {answer!r}")
