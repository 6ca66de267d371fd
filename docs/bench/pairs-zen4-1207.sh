#!/usr/bin/env bash
# Three rounds, each one llama.cpp run (1 and 2 threads) followed at once by ringlm at 1x1, 1x2 and 2x1, on the
# Yuan2-2B shape (NF4, NF4 lm_head, f16 KV cache, 64-token prompt, 48 generated): the current-figures pairs.
#   docs/bench/pairs-zen4-1207.sh      (from the repository root, after cargo build --release)
set -euo pipefail
for r in 1 2 3; do
  scripts/llamacpp-shape-bench 1 2 > docs/bench/llamacpp-yuan2-2b-shape-zen4-1207-r$r.jsonl
  out=docs/bench/ringlm-yuan2-2b-zen4-1207-r$r.jsonl; : > $out
  for layout in "1 1" "1 2" "2 1"; do
    set -- $layout
    target/release/ringlm bench --preset yuan2-2b --np $1 --threads $2 --prompt 64 --gen 48 \
      --kv-cache f16 --lm-head nf4 --json 2>/dev/null | tail -1 >> $out
  done
done
