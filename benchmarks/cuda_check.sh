#!/usr/bin/env bash
# The CUDA check in one command: CUDA tests, paper-size benchmarks, two AMP training iterations at
# 513 crops, docs/benchmarks.md regenerated. About 5 minutes on one GPU; see benchmarks/cuda_check.py.
#
#   bash benchmarks/cuda_check.sh             # on a machine with one NVIDIA GPU
#   bash benchmarks/cuda_check.sh --dry-run   # print the steps and run them tiny, on CPU, in seconds
#
# The interpreter: $PYTHON, else .venv/bin/python (made by `python3 run.py test`), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "cuda_check: $py cannot import torch; set PYTHON to an interpreter with a CUDA build of torch," \
         "or run 'python3 run.py test' once to make .venv" >&2
    exit 2
fi
exec "$py" benchmarks/cuda_check.py --python "$py" "$@"
