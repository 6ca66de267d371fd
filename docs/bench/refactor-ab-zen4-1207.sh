#!/usr/bin/env bash
# A/B of `ringlm bench` between two builds, in turn (ABBA), 6 rounds at 1x2 and 2x1.
# OLD_BUILD=dir NEW_BUILD=dir OUT=file.jsonl docs/bench/refactor-ab-zen4-1207.sh
OLD=$OLD_BUILD/ringlm; NEW=$NEW_BUILD/ringlm
out=${OUT:-ab.jsonl}; : > $out
common="bench --preset yuan2-2b --prompt 64 --gen 96 --kv-cache f16 --lm-head nf4 --json"
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for layout in "1x2" "2x1"; do
    for b in $order; do
      bin=$OLD; [ $b = new ] && bin=$NEW
      if [ $layout = 1x2 ]; then args="--np 1 --threads 2"; else args="--np 2 --threads 1"; fi
      line=$($bin $common $args 2>/dev/null | tail -1)
      echo "{\"round\":$r,\"layout\":\"$layout\",\"build\":\"$b\",\"bench\":$line}" >> $out
    done
  done
done

