#!/usr/bin/env bash
# Prompt lookup on editing tasks (docs/bench/speculate/*.txt: the model asked to repeat a passage with a
# small change), SmolLM2-135M-Instruct from its Q4_1 GGUF kept in NF4, greedy, 400 tokens at most: each
# prompt without and with --speculate lookup in turn (the order alternating by round), ROUNDS rounds, at
# np 1 (2 threads) and np 2, and llama.cpp's llama-lookup (prompt lookup decoding, 2 threads, greedy, 8
# drafts at most; built by scripts/llama-lookup-peer) on the same file and prompts in the same rounds. One
# JSON line per run: decode tokens/s from the summary line, the answer's length; a line with "error" if
# ringlm's text with lookup differs from its text without. llama.cpp's text is its own (Q4_1 arithmetic,
# not NF4), so its answers differ in length and content and its figures are context, not a pair.
#
#   docs/bench/speculate-smollm2.sh [ROUNDS] > docs/bench/speculate-<machine>-<date>.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
gguf=$(scripts/fetch-smollm2)
peer=$(scripts/llama-lookup-peer)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() {  # NP MODE PROMPT
  target/release/ringlm generate --model "$gguf" --weights nf4 --np "$1" --raw --prompt "$(cat "$3")" \
    --max-tokens 400 --speculate "$2" >"$tmp/$1-$2.txt" 2>"$tmp/err"
  local tps tokens
  tps=$(grep -o 'answer [0-9]* tokens at [0-9.]*' "$tmp/err" | awk '{print $5}')
  tokens=$(grep -o 'answer [0-9]* tokens' "$tmp/err" | awk '{print $2}')
  echo "{\"round\":$r,\"np\":$1,\"speculate\":\"$2\",\"prompt\":\"$(basename "$3")\",\"tokens\":$tokens,\"decode_tokens_per_s\":$tps}"
}
peer_run() {  # PROMPT
  LD_LIBRARY_PATH=$peer "$peer/llama-lookup" -m "$gguf" -f "$1" -n 400 --temp 0 -t 2 \
    --spec-draft-n-max 8 >"$tmp/peer" 2>&1 || true
  local line acc
  line=$(grep -o 'decoded *[0-9]* tokens in *[0-9.]* seconds, speed: *[0-9.]*' "$tmp/peer" | tr -s ' ')
  acc=$(grep -o 'accept *= *[0-9.]*%' "$tmp/peer" | grep -o '[0-9.]*')
  echo "{\"round\":$r,\"engine\":\"llama-lookup\",\"prompt\":\"$(basename "$1")\",\"tokens\":$(echo "$line" | awk '{print $2}'),\"decode_tokens_per_s\":$(echo "$line" | awk '{print $NF}'),\"accept_percent\":${acc:-null}}"
}
for r in $(seq "$rounds"); do
  for p in docs/bench/speculate/*.txt; do peer_run "$p"; done
  for np in 1 2; do
    for p in docs/bench/speculate/*.txt; do
      if [ $((r % 2)) = 1 ]; then modes="off lookup"; else modes="lookup off"; fi
      for m in $modes; do run "$np" "$m" "$p"; done
      cmp -s "$tmp/$np-off.txt" "$tmp/$np-lookup.txt" || echo "{\"round\":$r,\"np\":$np,\"prompt\":\"$(basename "$p")\",\"error\":\"texts differ\"}"
    done
  done
done
