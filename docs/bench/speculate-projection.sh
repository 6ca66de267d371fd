#!/usr/bin/env bash
# Speculative decoding's projection for the large shapes (issue 35): Yuan2-102B's first 6 layers with a
# whole Yuan2-2B-shaped draft model (random weights, NF4), verify steps of K = 4 drafts plus one timed in
# turn with one-token steps, projected to 84 layers at acceptance 0.7; and the Yuan2-2B shape's verify step
# for K = 1, 2, 4, 8. ROUNDS rounds, np 1 × 2 threads. One JSON object per run (`ringlm bench --json`).
#
#   docs/bench/speculate-projection.sh [ROUNDS] > docs/bench/speculate-projection-<machine>-<date>.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
for r in $(seq "$rounds"); do
  target/release/ringlm bench --preset yuan2-102b --layers 6 --draft-preset yuan2-2b --draft-tokens 4 \
    --accept 0.7 --gen 12 --json
  for k in 1 2 4 8; do
    target/release/ringlm bench --preset yuan2-2b --draft-tokens $k --accept 0.7 --gen 16 --json
  done
done
