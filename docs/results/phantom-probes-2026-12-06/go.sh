#!/bin/bash
# usage: go.sh NAME SEED [extra trainer args...]; 1 thread, cscpa only, MAIN_SETTINGS
name=$1; seed=$2; shift 2
S="--backbone efficientnet_lite0 --output-stride 8 --head-channels 128 --resize 128 --crop 96 --epochs 10 --pretrain-epochs 4 --iters-per-epoch 20 --batch 4 --lr 0.01 --precise-bn 10 --epa-gate --ema 0.98"
OMP_NUM_THREADS=1 exec .venv/bin/python -m examples.train_busi --method cscpa --data phantom --labeled 1/8 --workers 0 $S --seed $seed "$@" --out runs/probe/$name > runs/probe/$name.log 2>&1
