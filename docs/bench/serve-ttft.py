#!/usr/bin/env python3
"""Two time-to-first-token checks of a running `ringlm serve` (issue 32), printed as JSON lines:

1. shared prefix: a ~1,000-token system text, then two requests that begin with it and ask different
   questions; the second's TTFT against the first's (it starts after the stored beginning).
2. arrival under load: a request with a ~100-token prompt alone, then the same while 8 others decode;
   its TTFT against its alone TTFT plus two steps of the 8 (their time per output token).

    docs/bench/serve-ttft.py http://127.0.0.1:8000 [ROUNDS]
"""
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse

url = urllib.parse.urlparse(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
words = ("the river morning city light across old market quiet people walked toward bridge while small "
         "boats moved under clouds and children played near water stone houses stood along narrow streets").split()


def ttft(prompt, max_tokens=1):
    """Seconds to the first streamed token, and to the end."""
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t = time.time()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    first = None
    for raw in c.getresponse():
        line = raw.decode().strip()
        if line.startswith("data:") and first is None and '"text"' in line:
            first = time.time() - t
        if line == "data: [DONE]":
            break
    return first, time.time() - t


for r in range(rounds):
    rng = random.Random(r)
    system = " ".join(rng.choice(words) for _ in range(850))  # about 1,000 tokens
    a, _ = ttft(system + f" Question {r}a: what is in the city?")
    b, _ = ttft(system + f" Question {r}b: what is on the river?")
    print(json.dumps({"check": "shared_prefix", "round": r, "first_ttft_s": a, "second_ttft_s": b,
                      "ratio": b / a}))

    prompt = " ".join(rng.choice(words) for _ in range(90))
    alone, _ = ttft(prompt + f" ({r})")
    done, tpot = [], []

    def decoder(i):
        t0, t1 = ttft(f"{i} " + " ".join(rng.choice(words) for _ in range(20)), max_tokens=200)
        tpot.append((t1 - t0) / 199)

    threads = [threading.Thread(target=decoder, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # the 8 are decoding
    loaded, _ = ttft(prompt + f" [{r}]")
    for t in threads:
        t.join()
    step = sorted(tpot)[len(tpot) // 2]
    print(json.dumps({"check": "arrival_under_8", "round": r, "alone_ttft_s": alone, "loaded_ttft_s": loaded,
                      "step_s": step, "bound_s": alone + 2 * step, "within": loaded <= alone + 2 * step}))
