"""examples/export.py: a trained checkpoint as .pt2 and ONNX, round-tripped against the eager model."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from examples import export
from examples.engine.checkpoint import save_atomic
from examples.models.deeplab import DeepLabV3Plus
from examples.models.trained import load_trained as load_model
from examples.engine.run import build_model
from examples.engine.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ONNX_MISSING = export.missing_onnx_packages()
needs_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING),
    reason=f"the export extra is not installed ({', '.join(ONNX_MISSING)} not importable): pip install -e '.[export]'",
)
DIFFERENCE = re.compile(r"\[export\] (\S+) on \(1, 3, (\d+), (\d+)\): largest \|logit difference\| (\S+) \(ok\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A best.pt as the trainer writes it (config and model state), for the smallest network
    the trainer builds: CSC-PA on ResNet-18 at stride 16, FPA in 'self' pairing and an EPA
    bank filled, so both layers are in the exported graph."""
    config = TrainConfig(backbone="resnet18", output_stride=16, pretrained=False, head_channels=16, crop=64,
                         fpa_eval="self")
    torch.manual_seed(0)
    model = build_model(config)
    assert isinstance(model, DeepLabV3Plus) and model.epa is not None
    model.epa.container.initialize(torch.randn(300, model.feature_channels))
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_atomic({"config": dataclasses.asdict(config), "model": model.state_dict(), "epoch": 1, "val_dice": 0.5}, path)
    return path


def _eager(path: Path, x: Tensor) -> Tensor:
    model, _ = load_model(path, torch.device("cpu"))
    with torch.no_grad():
        return model(x).logits


def _reported(output: str) -> list[tuple[str, tuple[int, int], float]]:
    return [(name, (int(h), int(w)), float(d)) for name, h, w, d in DIFFERENCE.findall(output)]


def test_pt2_round_trip_equals_the_eager_model(checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70), dtype=np.uint8)).save(tmp_path / "scan.png")
    assert export.main([str(checkpoint), "--format", "pt2", "--sample", str(tmp_path / "scan.png"),
                        "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "FPA: eval pairing 'self'; EPA: stored edge bank" in output
    assert "dynamic height and width, 17 <= H, 17 <= W" in output
    # checked at the traced size (the sample resized to the checkpoint's 64) and at another one
    reported = _reported(output)
    assert [(name, size) for name, size, _ in reported] == [("best.pt2", (64, 64)), ("best.pt2", (77, 71))]
    assert all(d <= 1e-4 for *_, d in reported)
    assert not (tmp_path / "best.onnx").exists()

    program = torch.export.load(tmp_path / "best.pt2")
    x = torch.randn(1, 3, 96, 80)  # a size it was not traced at
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, _eager(checkpoint, x), atol=1e-4, rtol=1e-4)


@needs_onnx
def test_onnx_round_trip_equals_the_eager_model(checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime

    assert export.main([str(checkpoint), "--format", "onnx", "--out", str(tmp_path)]) == 0
    reported = _reported(capsys.readouterr().out)
    assert [name for name, *_ in reported] == ["best.onnx", "best.onnx"]
    assert all(d <= 1e-4 for *_, d in reported)
    assert not (tmp_path / "best.pt2").exists() and not list(tmp_path.glob("*.data"))  # weights inside

    session = onnxruntime.InferenceSession(str(tmp_path / "best.onnx"), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape[:2] == [1, 3] and all(isinstance(s, str) for s in image.shape[2:])
    x = torch.randn(1, 3, 96, 80)
    (got,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), _eager(checkpoint, x), atol=1e-4, rtol=1e-4)


class _Output(NamedTuple):
    logits: Tensor


class _FixedSize(nn.Module):
    """A learned (1, 3, 8, 6) offset, like a positional embedding: the exporter must
    specialise H and W to 8 and 6."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, 3, 8, 6))

    def forward(self, x: Tensor) -> _Output:
        return _Output(x + self.offset)


class _PixelCount(nn.Module):
    """Branches on H·W = 48: a relation, not a range, so the exporter keeps both axes
    symbolic with a runtime guard, and only a run at another size shows the graph refuses it
    (the eager model takes the other branch)."""

    def forward(self, x: Tensor) -> _Output:
        return _Output(x * 2 if x.shape[2] * x.shape[3] == 48 else x * 3)


class _AnySize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> _Output:
        return _Output(self.conv(x))


def test_a_size_the_model_fixes_is_reported_as_fixed() -> None:
    x = torch.randn(1, 3, 8, 6)
    sides = export.accepted_sides(export.export_program(_FixedSize(), x))
    assert sides == (export.Side("H", 8, 8, 8), export.Side("W", 6, 6, 6))
    assert export.second_size(*sides, x) is None
    assert export.describe(sides, x).startswith("only (1, 3, 8, 6) inputs (H fixed at 8, W fixed at 6)")


def test_a_graph_that_refuses_the_second_size_fails_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    model, x = _PixelCount(), torch.randn(1, 3, 8, 6)
    program = export.export_program(model, x)
    sides = export.accepted_sides(program)
    assert all(side.size is None for side in sides)
    other = export.second_size(*sides, x)
    assert other == (21, 13)
    assert export.check("m.pt2", program.module(), model, x, 1e-4)
    assert not export.check("m.pt2", program.module(), model, torch.randn(1, 3, *other), 1e-4)
    assert "m.pt2 on (1, 3, 21, 13): FAILED, the graph does not run (AssertionError: Guard failed" \
        in capsys.readouterr().out


def test_a_difference_above_atol_fails_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    model, x = _AnySize().eval(), torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        assert export.check("m.onnx", lambda x: model(x).logits + 1e-5, model, x, 1e-4)
        assert not export.check("m.onnx", lambda x: model(x).logits + 1e-3, model, x, 1e-4)
    output = capsys.readouterr().out
    assert "m.onnx on (1, 3, 10, 12): largest |logit difference| 1e-05 (ok)" in output
    assert "m.onnx on (1, 3, 10, 12): largest |logit difference| 0.001 (FAILED: above --atol 0.0001)" in output


def test_a_dynamic_graph_that_cannot_be_written_falls_back_to_a_fixed_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model, x = _AnySize().eval(), torch.randn(1, 3, 10, 12)
    program = export.export_program(model, x)
    assert all(side.size is None for side in export.accepted_sides(program))

    def picky(program: torch.export.ExportedProgram, x: Tensor, path: Path) -> None:
        if any(side.size is None for side in export.accepted_sides(program)):
            path.write_bytes(b"half")
            raise RuntimeError("op math.ceil is not serialisable\nmore detail")
        torch.export.save(program, path)

    monkeypatch.setitem(export.WRITERS, "pt2", ("torch.export.save", picky))
    written = export.write("pt2", program, lambda: torch.export.export(export.Logits(model), (x,)), x,
                           tmp_path / "m.pt2")
    assert export.accepted_sides(written) == (export.Side("H", 10, 10, 10), export.Side("W", 12, 12, 12))
    assert "cannot write the dynamic-size graph (RuntimeError: op math.ceil is not serialisable); m.pt2 is traced " \
           "at the fixed size 10 x 12" in capsys.readouterr().out
    torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), model(x).logits)


# --- bad input -------------------------------------------------------------------------------


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"checkpoint .*nothing\.pt: no such file"):
        export.main([str(tmp_path / "nothing.pt")])


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not a checkpoint of examples/train_busi.py"):
        export.main([str(tmp_path / "other.pt"), "--format", "pt2"])


def test_a_missing_sample_image_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--sample .*scan\.png: no such image file"):
        export.main([str(checkpoint), "--format", "pt2", "--sample", str(tmp_path / "scan.png"), "--out", str(tmp_path)])


def test_a_negative_atol_is_rejected(checkpoint: Path) -> None:
    with pytest.raises(SystemExit, match="--atol must be >= 0, got -1"):
        export.main([str(checkpoint), "--atol", "-1"])


def test_missing_onnx_packages_say_what_to_install(checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # None in sys.modules: the import fails
    with pytest.raises(SystemExit, match=r"onnxscript cannot be imported.*pip install \"cscpa_layers\[export\]\".*"
                                         r"--format pt2"):
        export.main([str(checkpoint), "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # it failed before writing anything
