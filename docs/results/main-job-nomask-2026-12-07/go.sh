#!/bin/bash
# The README's main job with --no-masking: seeds 0-2 at 2 threads (full job, alone, timed),
# then CSC-PA alone at 1 thread (two at once), then seeds 3-5 at 2 threads.
cd /work/main
D=runs/nomask
full2t() {
  s=$1; start=$(date +%s)
  OMP_NUM_THREADS=2 python3 run.py main --seed $s --no-masking --out $D/s$s-2t > $D/s$s-2t.log 2>&1
  echo "seed $s 2t rc $? seconds $(( $(date +%s) - start )) end $(date +%T)" >> $D/times.txt
}
one1t() {
  s=$1; start=$(date +%s)
  OMP_NUM_THREADS=1 python3 run.py main --seed $s --no-masking --method cscpa --out $D/s$s-1t > $D/s$s-1t.log 2>&1
  echo "seed $s 1t rc $? seconds $(( $(date +%s) - start )) end $(date +%T) (shared cores)" >> $D/times.txt
}
for s in 0 1 2; do full2t $s; done
one1t 0 & one1t 1 & wait
one1t 2 & one1t 3 & wait
for s in 3 4 5; do full2t $s; done
echo done >> $D/times.txt
