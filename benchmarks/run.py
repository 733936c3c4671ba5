"""Run the benchmark suites and rewrite docs/benchmarks.md.

    python benchmarks/run.py --device cpu|cuda [--quick] [--suite NAME ...]

Writes ``benchmarks/results/<device>-<date>[-quick].json``: the run's metadata (git SHA, torch,
device name and count, CPU model, threads), its settings, and per suite every case's sizes,
dtype, median and IQR time and extra peak memory, or why it was skipped. Then regenerates
``docs/benchmarks.md`` from the newest results per device (see ``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness, report  # noqa: E402
from benchmarks.runner import Settings, run_suite  # noqa: E402
from benchmarks import suites  # noqa: E402

MODES = {
    # min_run_time (s), repeats: quick fits 5 minutes on 2 cores, full wants a quiet machine
    "full": Settings(min_run_time=2.0, repeats=5),
    "quick": Settings(min_run_time=0.3, repeats=3),
    "smoke": Settings(min_run_time=0.01, repeats=1),
    # the paper's size only, float32 and bfloat16: the CUDA check's few minutes of a lent GPU
    "paper": Settings(min_run_time=0.5, repeats=3, time_limit=30.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes and runs (under 5 minutes on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="one tiny configuration per suite (for the tests)")
    size.add_argument("--paper-size", action="store_true",
                      help="only the paper's size (B=8, C=512, 129², crop 513), float32 and bfloat16: minutes on a GPU")
    parser.add_argument("--suite", nargs="+", choices=suites.NAMES, metavar="NAME", help=f"suites to run, of {suites.NAMES}")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown page to rewrite")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the markdown page")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from existing results only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--time-limit", type=float, help="seconds one run may take before its series stops (default 60)")
    parser.add_argument("--min-run-time", type=float, help="seconds of timed runs per case")
    parser.add_argument("--repeats", type=int, help="least number of timed runs per case")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--memory-child", metavar="CASE_JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def memory_child(case_json: str) -> None:
    """Entry point of the fresh process of a CPU memory measurement; prints one JSON line."""
    case = harness.Case.from_json(case_json)
    peak = harness.cpu_peak_extra_child(suites.get(case.suite), case, torch.get_num_threads())
    print(json.dumps({"peak_extra_mib": peak}))


def results_path(results_dir: Path, device: str, mode: str) -> Path:
    date = datetime.date.today().isoformat()
    suffix = "" if mode == "full" else f"-{mode}"
    return results_dir / f"{device}-{date}{suffix}.json"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return None
    if args.report_only:
        write_docs(args)
        return None
    device = harness.select_device(args.device)  # SystemExit with a clear message if absent
    mode = "smoke" if args.smoke else "quick" if args.quick else "paper" if args.paper_size else "full"
    settings = MODES[mode]
    settings = Settings(
        min_run_time=settings.min_run_time if args.min_run_time is None else args.min_run_time,
        repeats=settings.repeats if args.repeats is None else args.repeats,
        time_limit=settings.time_limit if args.time_limit is None else args.time_limit,
        memory=not args.no_memory,
        # host memory is shared with everything else on the machine; a GPU's is the run's own
        memory_fraction=0.5 if device.type == "cpu" else 0.85,
    )
    if settings.memory and device.type == "cpu" and not harness.cpu_supports_peak_reset():
        raise SystemExit("benchmarks: CPU peak memory needs Linux /proc/self/clear_refs; pass --no-memory")
    names = args.suite or suites.NAMES
    meta = harness.metadata(device)
    print(f"benchmarks: {mode} run on {meta['device_name']} ({meta['threads']} threads), torch {meta['torch']}, "
          f"code {meta['git_sha'][:10]}", flush=True)
    busy = meta["cpu_busy_at_start"]
    if busy is not None and busy > report.BUSY_FRACTION:
        print(f"benchmarks: WARNING other processes use {busy:.0%} of the CPU: multi-threaded timings suffer far "
              "more than proportionally (threads wait for each other); re-run on an idle machine before "
              "trusting the numbers", flush=True)
    path = results_path(args.results_dir, device.type, mode)
    data: dict[str, Any] = {"meta": meta, "mode": mode, "settings": settings.to_dict(), "suites": {}}
    if path.exists():  # same device, day and mode: keep the suites not measured now
        previous = json.loads(path.read_text())
        if previous.get("mode") == mode and previous.get("settings") == data["settings"]:
            data["suites"] = {k: v for k, v in previous.get("suites", {}).items() if k not in names}
    start = time.perf_counter()
    for name in names:
        suite_start = time.perf_counter()
        section = run_suite(suites.get(name), device, mode, settings, log=lambda line: print(line, flush=True))
        section.update(git_sha=meta["git_sha"], created=meta["created"], machine=meta["device_name"],
                       seconds=round(time.perf_counter() - suite_start, 1))
        data["suites"][name] = section
        print(f"[{name}] done in {section['seconds']:.0f} s", flush=True)
        # written after every suite, so that an interrupted run keeps the suites it finished
        _write_results(path, data, start, device)
    print(f"benchmarks: wrote {path} after {data['seconds']:.0f} s", flush=True)
    if not args.no_docs and mode != "smoke":
        write_docs(args)
    return data


def _write_results(path: Path, data: dict[str, Any], start: float, device: torch.device) -> None:
    data["suites"] = {k: data["suites"][k] for k in suites.NAMES if k in data["suites"]}  # stable order
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["meta"]["loadavg_at_end"] = harness.load_average()
    data["meta"]["cpu_busy_at_end"] = harness.cpu_busy_fraction() if device.type == "cpu" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(path)  # atomic: a reader never sees half a file


def write_docs(args: argparse.Namespace) -> None:
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(report.render(args.results_dir))
    print(f"benchmarks: rewrote {args.docs}", flush=True)


if __name__ == "__main__":
    main()
