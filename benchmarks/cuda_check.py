"""The CUDA check: everything a lent GPU should measure, in one run of a few minutes.

    bash benchmarks/cuda_check.sh             # on a machine with one NVIDIA GPU, about 5 minutes
    bash benchmarks/cuda_check.sh --dry-run   # the same steps, tiny and on CPU, in seconds

Steps, each with its own time limit, run whatever the previous one gave:

1. **environment**: torch, CUDA and the GPU's name; stops here without a GPU.
2. **CUDA tests**: the tests whose name says CUDA (``pytest -k cuda``): fused SDPA kernels
   really used, CUDA equal to CPU for every op.
3. **benchmarks**: ``benchmarks/run.py --device cuda --paper-size``: every suite at the
   paper's size (B = 8, C = 512, 129², crop 513) in float32 and bfloat16.
4. **training**: two iterations of the reference trainer (``python -m examples.train_busi``) on the
   phantom at 513 crops with bfloat16 autocast: one of pre-training, then the container's
   initialisation, one CSC-PA iteration, validation and the test pass.
5. **report**: ``docs/benchmarks.md`` regenerated from the results.

It writes ``<results>/cuda-check-<date>.json``: per step the command, exit status, seconds and
the end of its output. ``--dry-run`` runs every step at tiny sizes on CPU into a temporary
folder (the tests are only collected) and leaves the real results and docs alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60  # the whole check must fit a short GPU lease


def steps(python: str, results: Path, docs: Path, work: Path, dry_run: bool) -> list[dict[str, Any]]:
    """The commands, as (name, argv, time limit); the dry run's are tiny and on CPU."""
    probe = (
        "import json, torch; ok = torch.cuda.is_available(); "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok, "
        "'device': torch.cuda.get_device_name(0) if ok else None, 'count': torch.cuda.device_count()}))"
    )
    if not dry_run:
        probe += "; raise SystemExit(0 if ok else 'no CUDA device: this check needs an NVIDIA GPU')"
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"]
    bench = [python, "benchmarks/run.py", "--results-dir", str(results), "--no-docs"]
    bench += ["--device", "cpu", "--smoke", "--no-memory", "--threads", "1"] if dry_run else ["--device", "cuda", "--paper-size"]
    train = [python, "-m", "examples.train_busi", "--data", "phantom", "--method", "cscpa", "--out", str(work / "train"),
             "--epochs", "2", "--pretrain-epochs", "1", "--iters-per-epoch", "1",
             "--no-pretrained", "--workers", "0", "--overlays", "0", "--batch", "2"]
    if dry_run:
        train += ["--device", "cpu", "--backbone", "resnet18", "--phantom-images", "24", "--resize", "64", "--crop", "64"]
    else:
        train += ["--device", "cuda", "--amp", "bf16", "--backbone", "resnet50", "--phantom-images", "48",
                  "--resize", "513", "--crop", "513"]
    report = [python, "benchmarks/run.py", "--report-only", "--results-dir", str(results), "--docs", str(docs)]
    return [
        {"name": "environment", "argv": [python, "-c", probe], "limit_s": 60},
        {"name": "CUDA tests", "argv": tests + (["--collect-only"] if dry_run else []), "limit_s": 150},
        {"name": "benchmarks", "argv": bench, "limit_s": 240},
        {"name": "training", "argv": train, "limit_s": 120},
        {"name": "report", "argv": report, "limit_s": 60},
    ]


def run_step(step: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(step["argv"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=step["limit_s"])
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        rc = 124
        # on a timeout the captured output can be bytes even with text=True (CPython's
        # TimeoutExpired keeps what it read undecoded): decode each part before formatting
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (error.stdout, error.stderr)]
        output = f"{parts[0]}{parts[1]}\nstopped after its limit of {step['limit_s']} s"
    seconds = round(time.perf_counter() - start, 1)
    tail = output.strip().splitlines()[-25:]
    return {"name": step["name"], "command": " ".join(step["argv"]), "rc": rc, "seconds": seconds, "tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the steps and run them tiny, on CPU, in a temporary folder")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where the JSON goes (default benchmarks/results; a temporary folder with --dry-run)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch (default: this one)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cuda-check-"))
    results = args.results_dir or (work / "results" if args.dry_run else ROOT / "benchmarks" / "results")
    docs = work / "benchmarks.md" if args.dry_run else ROOT / "docs" / "benchmarks.md"
    results.mkdir(parents=True, exist_ok=True)
    plan = steps(args.python, results, docs, work, args.dry_run)
    mode = "dry run (tiny, CPU)" if args.dry_run else "CUDA"
    print(f"cuda_check: {mode}, {len(plan)} steps, results in {results}", flush=True)
    for i, step in enumerate(plan, 1):
        print(f"  {i}. {step['name']} (limit {step['limit_s']} s): {' '.join(step['argv'])}", flush=True)
    record: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "steps": [],
    }
    start = time.perf_counter()
    for i, step in enumerate(plan, 1):
        result = run_step(step)
        record["steps"].append(result)
        status = "ok" if result["rc"] == 0 else f"FAILED (rc {result['rc']})"
        print(f"[{i}/{len(plan)}] {step['name']}: {status} in {result['seconds']:.0f} s", flush=True)
        if result["rc"] != 0 or step["name"] == "environment":
            print("    " + "\n    ".join(result["tail"][-8:]), flush=True)
        if step["name"] == "environment" and result["rc"] != 0:
            break  # nothing else can run without the device
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["within_budget"] = record["seconds"] <= BUDGET_S
    path = results / f"cuda-check-{datetime.date.today().isoformat()}{'-dry-run' if args.dry_run else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    failed = [s["name"] for s in record["steps"] if s["rc"] != 0]
    print(f"cuda_check: {len(record['steps']) - len(failed)} of {len(plan)} steps ok in {record['seconds']:.0f} s "
          f"(budget {BUDGET_S} s); wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or len(record["steps"]) < len(plan) else 0


if __name__ == "__main__":
    raise SystemExit(main())
