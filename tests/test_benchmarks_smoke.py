"""The benchmark harness runs: one tiny configuration per suite, its JSON, the markdown, the limits.

The suites themselves live in benchmarks/ and are never collected by pytest; these tests import
them as a library. Timings here are meaningless (tiny sizes); only the structure is checked.
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import harness, report, run, suites
from benchmarks.harness import Case, Series
from benchmarks.runner import Settings, run_suite
from benchmarks.suites.fpa import FPASuite

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"git_sha", "torch", "device", "device_name", "device_count", "cpu_model", "threads", "created"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every suite once at its smoke size, in this process, without the memory subprocesses.

    One thread: tiny kernels on two threads of a busy machine wait for each other far longer
    than they compute, which made this fixture take a minute instead of seconds.
    """
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        data = run.main(["--device", "cpu", "--smoke", "--no-memory", "--threads", "1", "--results-dir", str(out), "--no-docs"])
    finally:
        torch.set_num_threads(threads)
    assert data is not None
    yield out, data


def test_smoke_run_records_every_suite_with_metadata(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out, data = smoke_run
    files = list(out.glob("cpu-*-smoke.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text()) == data  # what main returned is what it wrote
    assert META_KEYS <= set(data["meta"])
    assert data["meta"]["threads"] == 1  # --threads 1
    assert data["meta"]["device"] == "cpu" and data["mode"] == "smoke"
    assert list(data["suites"]) == suites.NAMES
    for name, section in data["suites"].items():
        assert section["git_sha"] == data["meta"]["git_sha"]
        assert section["machine"] == data["meta"]["device_name"]
        if section.get("unavailable"):
            continue
        assert section["results"], name
        impls = set()
        for entry in section["results"]:
            assert entry["status"] == "ok", (name, entry)
            assert entry["median_s"] > 0 and entry["iqr_s"] >= 0 and entry["runs"] >= 1
            assert entry["dtype"] in harness.DTYPES and entry["sizes"]
            assert entry["flops"] >= 0
            if name in ("fpa_sdpa", "fpa", "pal", "iteration"):  # attention, cosines, convolutions: never 0
                assert entry["flops"] > 0 and entry["gflop_per_s"] > 0, (name, entry)
            impls.add(entry["impl"])
        assert impls == set(section["impls"]), name  # both sides of every comparison ran


def test_markdown_has_a_table_per_suite_and_every_target(smoke_run: tuple[Path, dict[str, Any]]) -> None:
    out, data = smoke_run
    text = report.render(out, smoke=True)
    for section in data["suites"].values():
        assert f"### {section['title']}" in text
    for target in report.TARGETS:
        assert target.text in text
    assert "| op | dtype | sizes |" in text
    assert "## CUDA" in text and "Not measured yet" in text  # no CUDA results in out/
    assert "python benchmarks/run.py --device cuda" in text
    # smoke runs never reach the real page
    assert report.latest_results(out, "cpu") is None


def test_cpu_peak_memory_sees_the_dense_attention_matrix() -> None:
    """Fresh-process VmHWM: the dense FPA holds B N² floats at least, the layer much less.

    At N = 64² a square tile of the shared-score kernel (2^21 scores) is an eighth of the pair's
    score matrix, so the layer needs about 25 MiB against the dense path's 387 (measured on an
    AMD EPYC). At 32², which this test used before, one tile holds the whole matrix and the two
    came within 2.1x of each other, on the edge of the old factor-2 bound.
    """
    sizes = {"B": 2, "C": 8, "H": 64, "W": 64}
    matrix_mib = sizes["B"] * (64 * 64) ** 2 * 4 / 2**20  # 128 MiB
    dense = harness.cpu_peak_extra_mib(Case("fpa", "forward+backward", "reference", "float32", sizes), timeout=120)
    fast = harness.cpu_peak_extra_mib(Case("fpa", "forward+backward", "fast", "float32", sizes), timeout=120)
    assert dense >= matrix_mib
    assert fast < matrix_mib / 4  # the layer never holds a pair's whole score matrix


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--device cuda was asked for, but torch.cuda.is_available\(\) is False"):
        run.main(["--device", "cuda", "--smoke", "--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


class _TwoSizes(FPASuite):
    def plan(self, device: str, mode: str) -> list[Series]:
        sizes = [{"B": 2, "C": 4, "H": 3, "W": 3}, {"B": 2, "C": 4, "H": 4, "W": 4}]
        return [Series("forward", "float32", sizes, memory=False)]


def test_a_run_over_the_time_limit_stops_its_series() -> None:
    settings = Settings(min_run_time=0.0, repeats=1, time_limit=0.0, memory=False)
    section = run_suite(_TwoSizes(), torch.device("cpu"), "smoke", settings, log=lambda line: None)
    first, second = section["results"][:2], section["results"][2:]
    assert [e["status"] for e in section["results"]] == ["skipped: > 0 s"] * 4
    assert all("one run took" in e["note"] and e["single_run_s"] > 0 for e in first)
    assert all("series stopped" in e["note"] and "single_run_s" not in e for e in second)


def test_the_memory_guard_skips_before_running() -> None:
    settings = Settings(min_run_time=0.0, repeats=1, memory=False, memory_fraction=0.0)
    section = run_suite(_TwoSizes(), torch.device("cpu"), "smoke", settings, log=lambda line: None)
    assert [e["status"] for e in section["results"]] == ["skipped: out of memory"] * 4
    assert "estimated extra peak" in section["results"][0]["note"]
    assert all("single_run_s" not in e for e in section["results"])


def _entry(impl: str, seconds: float, mib: float, size: int) -> dict[str, Any]:
    return {
        "op": "forward+backward",
        "impl": impl,
        "dtype": "float32",
        "sizes": {"B": 8, "C": 512, "H": size, "W": size},
        "status": "ok",
        "median_s": seconds,
        "iqr_s": 0.0,
        "runs": 3,
        "peak_extra_mib": mib,
    }


def test_targets_are_judged_row_by_row() -> None:
    section: dict[str, Any] = {
        "impls": ["fast", "reference"],
        "results": [
            _entry("fast", 1.0, 100.0, 32),  # below 64²: not judged even though it misses
            _entry("reference", 1.0, 100.0, 32),
            _entry("fast", 1.0, 100.0, 64),
            _entry("reference", 2.5, 600.0, 64),  # 6x less memory: met
            _entry("fast", 1.0, 100.0, 96),
            _entry("reference", 1.5, 400.0, 96),  # 4x less: missed
        ],
    }
    fpa = next(t for t in report.TARGETS if t.suite == "fpa")
    result = report.evaluate(fpa, "cpu", section)
    assert result["verdict"] == "missed"
    assert (result["met_rows"], result["measured_rows"]) == (1, 2)
    assert [r["verdict"] for r in result["rows"]] == ["met", "missed"]
    assert result["rows"][1]["misses"] == ["memory 4.00× < 5×"]
    section["results"] = section["results"][:4]
    assert report.evaluate(fpa, "cpu", section)["verdict"] == "met"
    assert report.evaluate(fpa, "cpu", None)["verdict"] == "not measured"
    overhead = next(t for t in report.TARGETS if t.suite == "iteration" and t.devices == ("cpu",))
    assert report.evaluate(overhead, "cuda", section)["verdict"] == "not a target on this device"


def test_fpa_against_sdpa_is_an_overhead_target_at_n_64_squared() -> None:
    target = next(t for t in report.TARGETS if t.suite == "fpa_sdpa")
    rows = [
        {**_entry("fpa", 1.25, 0.0, 64), "flops": 130}, {**_entry("sdpa", 1.0, 0.0, 64), "flops": 100},  # 1.25x: met
        {**_entry("fpa", 1.4, 0.0, 96), "flops": 110}, {**_entry("sdpa", 1.0, 0.0, 96), "flops": 100},  # 1.4x: missed
    ]
    result = report.evaluate(target, "cpu", {"impls": ["fpa", "sdpa"], "results": rows})
    assert [r["verdict"] for r in result["rows"]] == ["met", "missed"]
    assert result["rows"][1]["misses"] == ["overhead 1.40× > 1.3×"]
    assert result["rows"][0]["flop_ratio"] == pytest.approx(1.3)


def test_the_iteration_target_is_judged_against_the_flop_floor() -> None:
    from benchmarks.suites.iteration import CPU_CONFIG

    target = next(t for t in report.TARGETS if t.suite == "iteration" and t.devices == ("cpu",))

    def row(impl: str, seconds: float, flops: int) -> dict[str, Any]:
        return {"op": "iteration", "impl": impl, "dtype": "float32", "sizes": dict(CPU_CONFIG), "status": "ok",
                "median_s": seconds, "iqr_s": 0.0, "runs": 3, "flops": flops}

    def verdict(cscpa_s: float, cscpa_flops: int, plain_flops: int = 100) -> dict[str, Any]:
        section = {"impls": ["cscpa", "plain"], "results": [row("cscpa", cscpa_s, cscpa_flops), row("plain", 1.0, plain_flops)]}
        return report.evaluate(target, "cpu", section)

    assert verdict(1.30, 120)["verdict"] == "met"  # 1.30 <= 1.1 x 1.2 = 1.32
    missed = verdict(1.34, 120)
    assert missed["verdict"] == "missed" and missed["rows"][0]["misses"] == ["overhead 1.34× > 1.1 × FLOP floor 1.20× = 1.32×"]
    assert verdict(1.0, 0, 0)["rows"][0]["misses"] == ["FLOPs not counted"]


def test_flop_counter_adds_what_torch_counts_as_zero_on_cpu() -> None:
    b, n, m, d = 2, 64, 48, 16
    q = torch.randn(b, 1, n, d, requires_grad=True)
    k = torch.randn(b, 1, m, d, requires_grad=True)
    v = torch.randn(b, 1, m, d, requires_grad=True)
    with harness.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert counter.get_total_flops() == (2 + 5) * 2 * b * n * m * d  # 2 matmuls forward, 5 backward
    out, a, w = torch.zeros(3, 5), torch.randn(3, 4), torch.randn(4, 5)
    with harness.flop_counter() as counter:
        out.addmm_(a, w)
        torch.mv(a, torch.randn(4))
        torch.zeros(2, 3, 5).baddbmm_(torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    assert counter.get_total_flops() == 2 * 3 * 4 * 5 + 2 * 3 * 4 + 2 * 2 * 3 * 4 * 5


def test_the_sdpa_baseline_runs_fpas_own_attention_call() -> None:
    # x + L_o(SDPA(q, k, v)) on the baseline's q, k, v must be the layer's output: the same call.
    from benchmarks.suites.fpa_sdpa import FPAvsSDPASuite
    from cscpa_layers import ForegroundPrototypeAttention

    sizes = {"B": 4, "C": 8, "H": 5, "W": 3}
    suite, cpu = FPAvsSDPASuite(), torch.device("cpu")
    fpa_out = suite.build(Case("fpa_sdpa", "forward", "fpa", "float32", sizes), cpu)()
    attended = suite.build(Case("fpa_sdpa", "forward", "sdpa", "float32", sizes), cpu)()
    torch.manual_seed(0)
    layer = ForegroundPrototypeAttention(8)  # the suite's seeded layer and input, rebuilt
    x = torch.randn(4, 8, 5, 3, generator=torch.Generator().manual_seed(0))
    rebuilt = x + layer.out(attended.squeeze(1)).transpose(1, 2).reshape(x.shape)  # type: ignore[attr-defined]
    torch.testing.assert_close(rebuilt, fpa_out)


def test_benchmarks_stay_out_of_pytest_collection() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["tool:pytest"]["testpaths"].split() == ["tests", "cscpa_layers"]
    assert not [p for p in (ROOT / "benchmarks").rglob("*.py") if p.name.startswith("test_") or p.name.endswith("_test.py")]


def test_the_overhead_target_is_judged_at_the_iteration_suites_cpu_config() -> None:
    from benchmarks.suites.iteration import CPU_CONFIG

    overhead = next(t for t in report.TARGETS if t.suite == "iteration")
    assert overhead.sizes == tuple(CPU_CONFIG.items())
    assert f"crop {CPU_CONFIG['crop']}" in overhead.text and f"ResNet-{CPU_CONFIG['resnet']}" in overhead.text


def test_an_interrupted_run_keeps_the_suites_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finished: list[str] = []

    def run_or_stop(suite: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if finished:  # the second suite is "interrupted"
            raise KeyboardInterrupt
        finished.append(suite.name)
        return {"impls": list(suite.impls), "results": []}

    monkeypatch.setattr(run, "run_suite", run_or_stop)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--device", "cpu", "--smoke", "--no-memory", "--results-dir", str(tmp_path), "--no-docs",
                  "--suite", "masking", "pal"])
    written = json.loads(next(tmp_path.glob("cpu-*-smoke.json")).read_text())
    assert finished == ["masking"] and list(written["suites"]) == ["masking"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_section_from_another_machine_names_it() -> None:
    # a run may carry sections measured elsewhere (run.py keeps the day's unmeasured suites)
    section = {"title": "T", "impls": ["fast", "reference"], "ratio": "speed-up", "results": [],
               "git_sha": "0123456789abcdef", "created": "2026-12-02", "machine": "Intel(R) Xeon(R) Processor"}
    there = "\n".join(report.suite_table("none", section, "cpu", "AMD EPYC"))
    assert "measured at `0123456789` on 2026-12-02 on another machine, Intel(R) Xeon(R) Processor" in there
    here = "\n".join(report.suite_table("none", section, "cpu", "Intel(R) Xeon(R) Processor"))
    assert "another machine" not in here


def test_suites_from_several_runs_of_a_day_are_named_by_run() -> None:
    def section(sha: str, created: str) -> dict[str, Any]:
        return {"git_sha": sha, "created": created, "results": []}

    one_run = {"suites": {"fpa": section("aaaaaaaaaa11", "T1"), "pal": section("aaaaaaaaaa11", "T1")}}
    assert report.runs_line(one_run) == []
    two_runs = {"suites": {"fpa": section("bbbbbbbbbb22", "T2"), "pal": section("aaaaaaaaaa11", "T1"),
                           "epa": section("aaaaaaaaaa11", "T1")}}
    line = "\n".join(report.runs_line(two_runs))
    assert "2 runs" in line
    assert "`pal`, `epa` at `aaaaaaaaaa` (T1); `fpa` at `bbbbbbbbbb` (T2)" in line
