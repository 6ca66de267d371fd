#!/usr/bin/env bash
# ringlm serve beside llama.cpp's llama-server (continuous batching, -np slots) on SmolLM2-135M, both
# measured by `ringlm bench-serve` in turn, ROUNDS rounds: greedy 96-token answers (ignore_eos) to 32-word
# prompts at concurrency 1..32. ringlm reads the Q4_1 GGUF llama-server reads, re-rounded to NF4 at load
# (--weights nf4; np 2 ranks × 1 thread, and 1 rank × 2 threads); llama-server 2 threads, 16 slots. One
# JSON line per run.
#
#   docs/bench/serve-vs-llama-server.sh [ROUNDS] > docs/bench/serve-<machine>-<date>.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
gguf=$(scripts/fetch-smollm2)
llama=$(scripts/llama-server-peer)
port=8190
levels=1,2,4,8,16,32
pid=
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; pid=; }
trap stop EXIT
wait_up() { for _ in $(seq 600); do curl -sf "localhost:$port/health" >/dev/null && return; sleep 0.2; done; exit 1; }
measure() {  # NAME
  target/release/ringlm bench-serve --url "http://127.0.0.1:$port" --concurrency $levels --requests 32 \
    --prompt-words 32 --max-tokens 96 --json | sed "s/^{/{\"server\":\"$1\",\"round\":$r,/"
}
for r in $(seq "$rounds"); do
  target/release/ringlm serve --model "$gguf" --weights nf4 --np 2 --port $port --max-seqs 16 2>/dev/null & pid=$!
  wait_up; measure ringlm-2x1; stop
  target/release/ringlm serve --model "$gguf" --weights nf4 --threads 2 --port $port --max-seqs 16 2>/dev/null & pid=$!
  wait_up; measure ringlm-1x2; stop
  "$llama" -m "$gguf" -t 2 -tb 2 -np 16 -c 4096 --port $port --no-webui --log-disable >/dev/null 2>&1 & pid=$!
  wait_up; measure llama-server; stop
done
