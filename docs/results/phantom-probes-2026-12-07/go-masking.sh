#!/bin/bash
# CSC-PA alone, MAIN_SETTINGS, 1 thread per run, two runs at a time: paper masking vs --no-masking
cd /work/main
S="--backbone efficientnet_lite0 --output-stride 8 --head-channels 128 --resize 128 --crop 96 --epochs 10 --pretrain-epochs 4 --iters-per-epoch 20 --batch 4 --lr 0.01 --precise-bn 10 --epa-gate --ema 0.98"
one() { name=$1; seed=$2; shift 2
  OMP_NUM_THREADS=1 .venv/bin/python -m examples.train_busi --method cscpa --data phantom --labeled 1/8 --workers 0 $S --seed $seed "$@" --out runs/probe7/$name > runs/probe7/$name.log 2>&1; }
for seed in 0 1 2; do
  one plain-s$seed-base $seed &
  one plain-s$seed-nomask $seed --no-masking &
  wait
done
echo done > runs/probe7/DONE
