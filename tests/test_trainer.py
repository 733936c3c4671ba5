"""The trainer end to end on the phantom: methods, ablations, resume, DDP, errors, predict."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from examples import train_busi
from examples.engine.arguments import config_for, parse_args
from examples.engine.batchnorm import reestimate_bn
from examples.engine.config import PRESETS
from examples.engine.run import build_model
from examples.engine.cscpa_step import CSCPAStep
from examples.engine.step import NonFiniteLossError
from examples.engine.evaluate import overlay_name

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--backbone", "resnet18", "--output-stride", "16", "--no-pretrained", "--crop", "64",
    "--epochs", "2", "--pretrain-epochs", "1", "--iters-per-epoch", "2", "--workers", "0",
    "--phantom-images", "30", "--batch", "2", "--overlays", "1",
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def both_methods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("both")
    assert train_busi.main([*TINY, "--method", "both", "--out", str(out)]) == 0
    yield out
    shutil.rmtree(out, ignore_errors=True)  # ~400 MB of checkpoints; CI's disk is not ours alone


def test_both_methods_train_and_write_results(both_methods: Path) -> None:
    summary = json.loads((both_methods / "summary.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["suponly", "cscpa"]
    for method in ("suponly", "cscpa"):
        fold = both_methods / method / "fold0"
        results = json.loads((fold / "results.json").read_text())
        assert results["config"]["method"] == method
        assert results["config"]["backbone"] == "resnet18"
        assert len(results["git_sha"]) in (40, 7) or results["git_sha"] == "unknown"
        assert 0.0 <= results["test"]["dice"] <= 1.0
        assert len(results["history"]) == 2  # validated after each epoch
        rows = (fold / "test_scores.csv").read_text().strip().splitlines()
        assert rows[0] == "id,dice,iou" and len(rows) - 1 == results["test"]["images"] > 0
        (overlay,) = (fold / "overlays").glob("*.png")
        assert not overlay.name.endswith(".png.png")
        assert (fold / "best.pt").is_file() and (fold / "last.pt").is_file()
    table = (both_methods / "summary.md").read_text()
    assert "SupOnly" in table and "CSC-PA" in table


def test_each_method_of_both_trains_the_network_it_would_train_alone(both_methods: Path, tmp_path: Path) -> None:
    # The arms are independent: CSC-PA after SupOnly starts from, and ends at, what --method cscpa gives
    assert train_busi.main([*TINY, "--method", "cscpa", "--overlays", "0", "--out", str(tmp_path)]) == 0
    alone = torch.load(tmp_path / "cscpa" / "fold0" / "last.pt", weights_only=False)["model"]
    after = torch.load(both_methods / "cscpa" / "fold0" / "last.pt", weights_only=False)["model"]
    assert alone.keys() == after.keys()
    for key, value in alone.items():
        assert torch.equal(after[key], value), key


def test_cscpa_checkpoint_holds_an_initialised_edge_bank(both_methods: Path) -> None:
    state = torch.load(both_methods / "cscpa" / "fold0" / "last.pt", weights_only=False)
    assert bool(state["model"]["epa.container.initialized"])
    assert state["model"]["epa.container.bank"].abs().sum() > 0
    suponly = torch.load(both_methods / "suponly" / "fold0" / "last.pt", weights_only=False)
    assert not any(key.startswith(("fpa.", "epa.")) for key in suponly["model"])


@pytest.mark.parametrize("flag", ["--no-fpa", "--no-epa", "--no-pal", "--no-masking"])
def test_ablation_flags(tmp_path: Path, flag: str) -> None:
    args = [*TINY, "--epochs", "2", "--iters-per-epoch", "1", "--overlays", "0", "--method", "cscpa", "--out", str(tmp_path), flag]
    assert train_busi.main(args) == 0
    results = json.loads((tmp_path / "cscpa" / "fold0" / "results.json").read_text())
    key = flag.removeprefix("--no-")
    assert results["config"][key] is False
    state = torch.load(tmp_path / "cscpa" / "fold0" / "last.pt", weights_only=False)["model"]
    assert any(k.startswith("fpa.") for k in state) == (flag != "--no-fpa")
    assert any(k.startswith("epa.") for k in state) == (flag != "--no-epa")
    last = results["history"][-1]
    if flag == "--no-pal":
        assert last["train_pal_labeled"] == 0.0 and last["train_pal_unlabeled"] == 0.0
    if flag == "--no-masking":
        assert last["train_masked"] == 0.0
    else:
        assert last["train_masked"] > 0.0


def test_bfloat16_autocast_on_cpu(tmp_path: Path) -> None:
    args = [*TINY, "--iters-per-epoch", "1", "--overlays", "0", "--method", "cscpa", "--amp", "bf16", "--out", str(tmp_path)]
    assert train_busi.main(args) == 0
    results = json.loads((tmp_path / "cscpa" / "fold0" / "results.json").read_text())
    assert results["config"]["amp"] == "bf16"
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in results["history"])


def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "beach.png").write_bytes(b"not a dataset")
    with pytest.raises(SystemExit, match=r"--data '.*holiday'"):
        train_busi.main([*TINY, "--data", str(tmp_path / "holiday"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"--data '.*missing'"):
        train_busi.main([*TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = CSCPAStep.train_step
    calls = {"n": 0}

    def failing(self: CSCPAStep, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise NonFiniteLossError("the stage-2 loss is nan; its step was not taken")
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CSCPAStep, "train_step", failing)
    args = [*TINY, "--epochs", "2", "--iters-per-epoch", "3", "--method", "cscpa", "--save-every", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"stopped: the stage-2 loss is nan.*last good checkpoint is kept"):
        train_busi.main(args)
    state = torch.load(tmp_path / "cscpa" / "fold0" / "last.pt", weights_only=False)
    assert state["iteration"] == 4  # 3 pre-training iterations + the one good CSC-PA iteration


RESUME = [*TINY, "--method", "cscpa", "--epochs", "3", "--iters-per-epoch", "3", "--save-every", "1", "--overlays", "0",
          "--precise-bn", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("whole")
    assert train_busi.main([*RESUME, "--out", str(out)]) == 0
    yield out / "cscpa" / "fold0" / "last.pt"
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 5, 6], ids=["end-of-pretraining", "mid-epoch", "end-of-epoch"])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: Path, stop: int) -> None:
    """Stop after iteration ``stop`` (3: pre-training's last step, before the container's
    initialisation and validation; 6: another epoch's last step), resume, compare everything."""
    with pytest.raises(SystemExit, match=f"stopped by --stop-after at iteration {stop}"):
        train_busi.main([*RESUME, "--out", str(tmp_path), "--stop-after", str(stop)])
    checkpoint = tmp_path / "cscpa" / "fold0" / "last.pt"
    cut = torch.load(checkpoint, weights_only=False)
    assert cut["iteration"] == stop and cut["epochs_ended"] == (stop - 1) // 3
    assert train_busi.main([*RESUME, "--out", str(tmp_path), "--resume"]) == 0
    a = torch.load(uninterrupted, weights_only=False)
    b = torch.load(checkpoint, weights_only=False)
    assert a["iteration"] == b["iteration"] == 9 and a["epochs_ended"] == b["epochs_ended"] == 3
    # Every draw is a function of (seed, step) and CPU kernels are deterministic at a fixed
    # thread count, so the states are equal to the bit (docs/training.md says what differs on GPUs).
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["history"] == b["history"] and len(a["history"]) == 3


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cut"
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.train_busi", *RESUME, "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    checkpoint = out / "cscpa" / "fold0" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    log, _ = process.communicate(timeout=300)
    assert "stopped by signal 15" in log, log[-2000:]
    stopped_at = torch.load(checkpoint, weights_only=False)["iteration"]
    assert 0 < stopped_at < 9
    resumed = _run("-m", "examples.train_busi", *RESUME, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoint} at iteration {stopped_at}" in resumed.stdout


@pytest.mark.slow
def test_ddp_with_two_cpu_ranks(tmp_path: Path) -> None:
    result = _run(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "examples.train_busi",
        *TINY, "--method", "cscpa", "--overlays", "0", "--out", str(tmp_path),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((tmp_path / "cscpa" / "fold0" / "results.json").read_text())
    assert results["world_size"] == 2
    state = torch.load(tmp_path / "cscpa" / "fold0" / "last.pt", weights_only=False)
    assert bool(state["model"]["epa.container.initialized"])


def test_predict_writes_masks_and_overlays(both_methods: Path, tmp_path: Path) -> None:
    from PIL import Image

    from examples.data.phantom_dataset import PhantomDataset

    raw = PhantomDataset(2, size=120).load(1)
    Image.fromarray(raw.image.permute(1, 2, 0).numpy()).save(tmp_path / "scan.png")
    result = _run("-m", "examples.predict", str(both_methods / "cscpa" / "fold0" / "best.pt"), str(tmp_path / "scan.png"),
                  "--out", str(tmp_path / "pred"), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    mask = Image.open(tmp_path / "pred" / "scan_pred.png")
    assert mask.size == (120, 120)
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert Image.open(tmp_path / "pred" / "scan_overlay.png").size == (120, 120)


def test_predict_rejects_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weights": 1}, tmp_path / "other.pt")
    result = _run("-m", "examples.predict", str(tmp_path / "other.pt"), str(tmp_path), "--device", "cpu")
    assert result.returncode != 0
    assert "is not a checkpoint of examples/train_busi.py" in result.stderr


@pytest.mark.parametrize(
    ("item_id", "name"),
    [("benign/benign (11).png", "benign_benign__11_.png"), ("case.7/scan", "case.7_scan.png"), ("a/b.c.jpg", "a_b.c.png")],
)
def test_overlay_names_drop_the_image_suffix(item_id: str, name: str) -> None:
    assert overlay_name(item_id) == name


def test_help_documents_every_flag() -> None:
    result = _run("-m", "examples.train_busi", "--help")
    assert result.returncode == 0
    for flag in ("--method", "--no-fpa", "--no-epa", "--no-pal", "--no-masking", "--data", "--split", "--fold", "--labeled",
                 "--backbone", "--crop", "--epochs", "--pretrain-epochs", "--batch", "--lr", "--seed", "--device", "--amp",
                 "--out", "--resume", "--workers", "--sync-bn", "--unsup-weight", "--precise-bn", "--preset",
                 "--head-channels", "--backbone-lr", "--epa-gate", "--lesion-threshold", "--unsup-rampup", "--select",
                 "--average-epochs"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_unsup_weight_must_be_finite_and_not_negative(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--unsup-weight", value])
    assert "--unsup-weight must be a finite number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--unsup-rampup", "-1"], "--unsup-rampup must be >= 0 (0: off), got -1"),
    (["--lesion-threshold", "1.5"], "--lesion-threshold must be in [0, 1], got 1.5"),
    (["--lesion-threshold", "0.5", "--reliability", "entropy"], "--lesion-threshold needs --reliability threshold"),
])
def test_pseudo_label_options_are_checked_at_parse_time(argv: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_diagnose_reports_on_a_cscpa_checkpoint(both_methods: Path, tmp_path: Path) -> None:
    from examples import diagnose

    report = tmp_path / "diag.json"
    assert diagnose.main([str(both_methods / "cscpa" / "fold0" / "last.pt"), "--batches", "2", "--test", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    for name in ("as trained", "EPA off", "FPA eval_pairing=identity", "BN re-estimated", "EPA off, BN re-estimated",
                 "test, as trained", "test, BN re-estimated"):
        assert 0.0 <= figures[name]["dice"] <= 1.0, name
    assert figures["epa_norm_ratio"] > 0.0
    quality = figures["pseudo_labels"]
    assert 0.0 <= quality["valid_share"] <= 1.0 and 0.0 <= quality["lesion_share"] <= 1.0


def test_diagnose_splits_pseudo_labels_by_lesion_kind(both_methods: Path) -> None:
    import dataclasses

    from examples import diagnose
    from examples.data.folds import fold_data, open_dataset
    from examples.engine.checkpoint import read_checkpoint
    from examples.models.deeplab import DeepLabV3Plus
    from examples.models.trained import trained_config

    checkpoint = both_methods / "cscpa" / "fold0" / "last.pt"
    with pytest.raises(SystemExit, match="--by-lesion-kind needs a checkpoint trained on the phantom with --phantom-hyperechoic"):
        diagnose.main([str(checkpoint), "--batches", "1", "--by-lesion-kind"])  # trained on the plain phantom
    state = read_checkpoint(checkpoint)
    config = dataclasses.replace(trained_config(state), phantom_hyperechoic=1.0)  # every lesion bright
    data = fold_data(open_dataset(config), both_methods / "splits.json", config)
    kinds = diagnose.pseudo_labels_by_kind(DeepLabV3Plus.from_checkpoint(state), data, config)
    lesion_pixels = sum(int(data.unlabeled.render(j).mask.sum()) for j in range(len(data.unlabeled)))
    assert kinds["bright"]["pixels"] == lesion_pixels > 0 and kinds["dark"]["pixels"] == 0
    assert np.isnan(kinds["dark"]["predicted"])
    for kind in ("bright", "background"):
        shares = kinds[kind]
        assert 0.0 <= shares["confident_lesion"] <= shares["predicted"] <= 1.0
        assert 0.0 <= shares["confident_lesion"] + shares["confident_background"] <= 1.0


def test_diagnose_rejects_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    from examples import diagnose

    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        diagnose.main([str(bogus)])


def test_precise_bn_must_not_be_negative(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--precise-bn", "-1"])
    assert "--precise-bn must be >= 0" in capsys.readouterr().err


def test_fpa_kv_stride_flag_is_checked_and_reaches_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--fpa-kv-stride", "0"])
    assert "--fpa-kv-stride must be >= 1, got 0" in capsys.readouterr().err
    args = parse_args(["--fpa-kv-stride", "2", "--backbone", "resnet18", "--no-pretrained"])
    model = build_model(config_for(args, "cscpa", 0))
    assert model.fpa is not None and model.fpa.kv_stride == 2


def test_precise_bn_averages_batch_statistics_with_dropout_off_and_draws_no_random_numbers() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), conv, torch.nn.BatchNorm2d(4, momentum=0.3))
    batches = [torch.randn(2, 3, 6, 6) * (1 + i) + i for i in range(3)]
    model[2].running_mean.fill_(5.0)  # stale statistics, to be replaced rather than blended
    state = torch.get_rng_state()
    model.eval()
    reestimate_bn(model, batches)
    assert torch.equal(torch.get_rng_state(), state)  # the dropout layer drew nothing
    assert not model.training and not model[0].training  # modes and momentum as they were
    assert model[2].momentum == 0.3
    with torch.no_grad():  # the plain average of per-batch statistics of conv(x): x undropped
        outs = [conv(x) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[2].running_mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[2].running_var, var, rtol=1e-6, atol=1e-6)
    assert int(model[2].num_batches_tracked) == 3


def test_precise_bn_changes_the_running_statistics_only(tmp_path: Path) -> None:
    base = [*TINY, "--method", "cscpa", "--iters-per-epoch", "2", "--overlays", "0"]
    assert train_busi.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert train_busi.main([*base, "--precise-bn", "2", "--out", str(tmp_path / "precise")]) == 0
    plain = torch.load(tmp_path / "plain" / "cscpa" / "fold0" / "last.pt", weights_only=False)["model"]
    precise = torch.load(tmp_path / "precise" / "cscpa" / "fold0" / "last.pt", weights_only=False)["model"]
    running = [k for k in plain if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert running
    # Training mode normalises with batch statistics: the weights (and the edge bank) follow the same path...
    for key in plain.keys() - set(running):
        assert torch.equal(plain[key], precise[key]), key
    # ... while the running statistics were recomputed before the last validation.
    assert any(not torch.equal(plain[k], precise[k]) for k in running if k.endswith("running_mean"))


def test_cpu_preset_sets_defaults_and_flags_override_it() -> None:
    args = parse_args(["--preset", "cpu"])
    for key, value in PRESETS["cpu"].items():
        assert getattr(args, key) == value, key
    args = parse_args(["--preset", "cpu", "--crop", "96", "--no-epa-gate", "--backbone", "resnet18"])
    assert (args.crop, args.epa_gate, args.backbone) == (96, False, "resnet18")
    assert parse_args([]).backbone == "resnet50"  # the paper's defaults without a preset


def test_backbone_learning_rate_is_a_separate_group_that_decays_too() -> None:
    from examples.models.deeplab import DeepLabV3Plus
    from examples.engine.optim import param_groups as _param_groups

    model = DeepLabV3Plus(backbone="resnet18", pretrained=False, fpa=False, epa=False, head_channels=16)
    groups = _param_groups(model, 0.01, 0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(0.001), 0.01]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / 10)
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.0009), pytest.approx(0.009)]
    assert len(_param_groups(model, 0.01, 1.0)) == 1


def test_head_channels_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--head-channels", "0"])
    assert "--head-channels must be >= 1" in capsys.readouterr().err


def test_collectives_use_the_process_groups_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL refuses CPU tensors; the stop-request all_reduce must use the training device."""
    import torch.distributed as dist

    from examples.engine.distributed import Distributed

    seen: list[torch.device] = []

    class Refused(Exception):
        pass

    def nccl_like_all_reduce(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        seen.append(tensor.device)
        if tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        raise Refused  # stop here: a meta tensor has no value to read

    group = Distributed(torch.device("meta"))  # stands in for cuda:k on this CPU-only machine
    group.enabled = True
    monkeypatch.setattr(dist, "all_reduce", nccl_like_all_reduce)
    with pytest.raises(Refused):
        group.any(True)
    assert seen == [torch.device("meta")]


def test_sync_bn_off_cuda_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--sync-bn needs CUDA processes"):
        train_busi.main([*TINY, "--device", "cpu", "--sync-bn", "--out", str(tmp_path)])


@pytest.mark.slow
def test_a_split_without_val_trains_with_select_last(tmp_path: Path) -> None:
    from examples.make_splits import main as make_splits

    split = tmp_path / "noval.json"
    assert make_splits(["phantom", "--count", "30", "--out", str(split), "--val-fraction", "0", "--quiet"]) == 0
    with pytest.raises(SystemExit, match="has no val part.*--select last"):
        train_busi.main([*TINY, "--split", str(split), "--out", str(tmp_path / "best")])
    args = [*TINY, "--split", str(split), "--select", "last", "--method", "cscpa", "--out", str(tmp_path / "last")]
    assert train_busi.main(args) == 0
    results = json.loads((tmp_path / "last" / "cscpa" / "fold0" / "results.json").read_text())
    assert results["selected_epoch"] == 2 and len(results["history"]) == 2
    assert np.isnan(results["history"][-1]["val_dice"]) and 0.0 <= results["test"]["dice"] <= 1.0
    # more epochs to average than the run has: all of them (here 2)
    args = [*TINY, "--split", str(split), "--select", "average", "--average-epochs", "6", "--out", str(tmp_path / "average")]
    assert train_busi.main(args) == 0
    assert torch.load(tmp_path / "average" / "cscpa" / "fold0" / "average.pt", weights_only=False)["average_epochs"] == 2


@pytest.mark.slow
def test_a_corrupt_image_is_named_mid_training_and_verify_data_finds_it_first(tmp_path: Path) -> None:
    from tests._data_trees import make_paired_tree, truncate

    root = tmp_path / "folder"
    make_paired_tree(root, count=30)
    args = [*TINY, "--data", str(root), "--method", "suponly", "--epochs", "1", "--iters-per-epoch", "3",
            "--batch", "4", "--out", str(tmp_path / "out")]
    from examples.make_splits import main as make_splits

    assert make_splits([str(root), "--out", str(tmp_path / "out" / "splits.json"), "--quiet"]) == 0
    split = json.loads((tmp_path / "out" / "splits.json").read_text())["folds"][0]
    bad = sorted(split["labeled"]["1/8"])[0]  # a labeled image: the first batches read it
    truncate(root / "images" / Path(bad).name)
    with pytest.raises(SystemExit, match=rf"stopped at iteration 0 .*cannot decode .*{Path(bad).name}.*--verify-data"):
        train_busi.main(args)
    with pytest.raises(SystemExit, match=rf"cannot decode .*{Path(bad).name}"):
        train_busi.main([*args, "--verify-data"])


def test_every_run_writes_metrics_csv_and_curves_png(both_methods: Path) -> None:
    import csv

    from examples.engine.curves import COLUMNS

    for method in ("suponly", "cscpa"):
        fold = both_methods / method / "fold0"
        with open(fold / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(COLUMNS) and [int(r["epoch"]) for r in rows] == [1, 2]
        results = json.loads((fold / "results.json").read_text())
        for row, record in zip(rows, results["history"]):
            assert float(row["val_dice"]) == pytest.approx(record["val_dice"])
            assert float(row["mean_ce_labeled"]) > 0 and float(row["mean_loss"]) > 0
        png = (fold / "curves.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # CSC-PA's stage-2 epoch logs the pseudo-label terms
    cscpa = json.loads((both_methods / "cscpa" / "fold0" / "results.json").read_text())["history"]
    assert cscpa[-1]["mean_pseudo_valid"] > 0 and "mean_ce_unlabeled" in cscpa[-1]


def test_ema_changes_what_is_scored_not_the_training(tmp_path: Path) -> None:
    base = [*TINY, "--method", "cscpa", "--iters-per-epoch", "3", "--overlays", "0", "--precise-bn", "1"]
    assert train_busi.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert train_busi.main([*base, "--ema", "0.9", "--out", str(tmp_path / "ema")]) == 0
    plain = torch.load(tmp_path / "plain" / "cscpa" / "fold0" / "last.pt", weights_only=False)
    ema = torch.load(tmp_path / "ema" / "cscpa" / "fold0" / "last.pt", weights_only=False)
    # The average never feeds back: the trained weights are the same to the bit...
    assert plain["ema"] is None and ema["ema"]["updates"] == 6
    running = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in plain["model"].items():
        assert key.endswith(running) or torch.equal(ema["model"][key], value), key
    # ... and --precise-bn re-estimated the statistics of what validation scores: the plain
    # run's network, the average only under --ema (the network keeps its momentum averages)
    assert any(not torch.equal(ema["model"][k], v) for k, v in plain["model"].items() if k.endswith("running_mean"))
    # every training forward, never reset: 3 pre-training steps of 1 and 3 two-stage steps of 2
    assert int(ema["model"]["backbone.bn1.num_batches_tracked"]) == 9
    assert int(plain["model"]["backbone.bn1.num_batches_tracked"]) == 1  # the last epoch's 1 batch
    # ... while validation scored the average, which is not the last step's weights.
    average = ema["ema"]["average"]
    assert any(not torch.equal(average[k], v) for k, v in ema["model"].items() if k.endswith(".weight"))
    assert [r["val_dice"] for r in plain["history"]] != [r["val_dice"] for r in ema["history"]]
    best = torch.load(tmp_path / "ema" / "cscpa" / "fold0" / "best.pt", weights_only=False)
    # best.pt holds the average of its epoch: the last one's is in last.pt, the first one's is not
    same = all(torch.equal(best["model"][k], v) for k, v in average.items())
    assert same == (best["epoch"] == 2), best["epoch"]
    with pytest.raises(SystemExit, match="it was made with ema=0.9, this run has ema=0.0"):
        train_busi.main([*base, "--out", str(tmp_path / "ema"), "--resume"])


@pytest.mark.slow
def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    args = [*RESUME, "--ema", "0.9"]
    assert train_busi.main([*args, "--out", str(tmp_path / "whole")]) == 0
    with pytest.raises(SystemExit, match="stopped by --stop-after at iteration 5"):
        train_busi.main([*args, "--out", str(tmp_path / "cut"), "--stop-after", "5"])
    assert train_busi.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a = torch.load(tmp_path / "whole" / "cscpa" / "fold0" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "cscpa" / "fold0" / "last.pt", weights_only=False)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 9
    for key, value in a["ema"]["average"].items():
        assert torch.equal(b["ema"]["average"][key], value), key
    assert a["history"] == b["history"]


@pytest.mark.slow
def test_select_average_scores_the_mean_of_the_last_epochs_and_resumes_exactly(tmp_path: Path) -> None:
    args = [*RESUME, "--ema", "0.9", "--select", "average", "--average-epochs", "2"]
    assert train_busi.main([*args, "--out", str(tmp_path / "whole")]) == 0
    # iteration 7 is inside epoch 3, after epoch 2 (the first averaged one) has ended
    with pytest.raises(SystemExit, match="stopped by --stop-after at iteration 7"):
        train_busi.main([*args, "--out", str(tmp_path / "cut"), "--stop-after", "7"])
    assert torch.load(tmp_path / "cut" / "cscpa" / "fold0" / "last.pt", weights_only=False)["epoch_average"]["count"] == 1
    assert train_busi.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (torch.load(tmp_path / d / "cscpa" / "fold0" / "average.pt", weights_only=False) for d in ("whole", "cut"))
    assert whole["average_epochs"] == 2 and whole["epoch"] == 3
    for key, value in whole["model"].items():
        assert torch.equal(cut["model"][key], value), key
    # The weights are the mean of the last two epochs' averages, not the last one's, and the
    # BatchNorm statistics were re-estimated for them.
    last = torch.load(tmp_path / "whole" / "cscpa" / "fold0" / "last.pt", weights_only=False)["ema"]["average"]
    assert any(not torch.equal(whole["model"][k], v) for k, v in last.items() if k.endswith(".weight"))
    assert any(not torch.equal(whole["model"][k], v) for k, v in last.items() if k.endswith("running_mean"))
    results = json.loads((tmp_path / "whole" / "cscpa" / "fold0" / "results.json").read_text())
    assert results["config"]["select"] == "average" and 0.0 <= results["test"]["dice"] <= 1.0
    # a resume that would average other epochs than the ones the checkpoint holds is refused
    with pytest.raises(SystemExit, match="stopped by --stop-after at iteration 7"):
        train_busi.main([*args, "--out", str(tmp_path / "other"), "--stop-after", "7"])
    with pytest.raises(SystemExit, match="the average needs 2 ended epoch.s., the checkpoint holds 1"):
        train_busi.main([*args[:-1], "3", "--out", str(tmp_path / "other"), "--resume"])


@pytest.mark.slow
def test_an_average_of_one_epoch_is_the_last_epochs_weights(tmp_path: Path) -> None:
    args = [*RESUME, "--ema", "0.9", "--select", "average", "--average-epochs", "1", "--out", str(tmp_path)]
    assert train_busi.main(args) == 0
    average = torch.load(tmp_path / "cscpa" / "fold0" / "average.pt", weights_only=False)["model"]
    last = torch.load(tmp_path / "cscpa" / "fold0" / "last.pt", weights_only=False)["ema"]["average"]
    weights = [k for k in last if k.endswith((".weight", ".bias")) and "bn" not in k]
    assert weights and all(torch.equal(average[k], last[k]) for k in weights)


def test_average_epochs_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--select", "average", "--average-epochs", "0"])
    assert "--average-epochs must be >= 1, got 0" in capsys.readouterr().err


def test_ema_must_be_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--ema", "1"])
    assert "--ema must be in [0, 1) (0: off), got 1.0" in capsys.readouterr().err
