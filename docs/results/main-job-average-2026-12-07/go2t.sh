#!/bin/bash
# The README's main job at 2 threads, seeds 0-2, each alone; wall time from the command to its end.
cd /work/main
for s in ${SEEDS:-0 1 2}; do
  start=$(date +%s)
  OMP_NUM_THREADS=2 python3 run.py main --seed $s --out runs/check-avg/s$s-2t > runs/check-avg/s$s-2t.log 2>&1
  echo "seed $s rc $? seconds $(( $(date +%s) - start ))" >> runs/check-avg/times-2t.txt
done
