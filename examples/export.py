"""Export a trained checkpoint as a torch.export program (.pt2) and as ONNX, and check both.

    python -m examples.export CHECKPOINT [--out DIR] [--format both|pt2|onnx] [--sample IMAGE]
                              [--atol 1e-4] [--seed 0]

CHECKPOINT is a best.pt, last.pt or average.pt of the trainer. The network is rebuilt from the
checkpoint's own config (``DeepLabV3Plus.from_checkpoint``) and exported in eval mode, as predict runs it: FPA with
the checkpoint's eval pairing (``self`` unless the run chose ``--fpa-eval identity``) and EPA
with its stored edge bank, both part of the graph. DIR (default: the checkpoint's folder)
receives ``<stem>.pt2`` (``torch.export.save``) and ``<stem>.onnx`` (``torch.onnx.export(...,
dynamo=True)``, one file, weights inside).

Both graphs take one normalised image, (1, 3, H, W) float32 (ImageNet statistics,
``examples.data.transforms.normalize``), and return the logits, (1, 2, H, W). Height and width are
dynamic when the exporter can keep them so (the accepted range is printed); otherwise the
graph is fixed to the sample's size, and the command says so.

Each artefact is read back from disk and run on the sample (a seeded random image of the
checkpoint's evaluation size, or ``--sample IMAGE`` resized as predict resizes it), and on a
second size when the graph is dynamic; onnxruntime runs the ONNX file. The largest absolute
difference from the eager model's logits is printed, and the exit status is 1 when it exceeds
``--atol``. ONNX needs the ``export`` extra: ``pip install "cscpa_layers[export]"`` (onnx,
onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torchvision import tv_tensors

from examples.data.images import DataError, read_image
from examples.data.samples import RawSample
from examples.data.transforms import EvalTransform
from examples.models.trained import load_trained

FORMATS = ("both", "pt2", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class Logits(nn.Module):
    """The network as the exported graphs see it: a normalised (B, 3, H, W) image in, the
    (B, K, H, W) logits out (the features and stride-4 logits are training outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits  # (B, K, H, W)


class Side(NamedTuple):
    """What an exported graph accepts along one input axis: a fixed ``size``, or the range
    ``low``..``high`` (``high`` None: unbounded)."""

    name: str
    size: int | None
    low: int
    high: int | None

    def __str__(self) -> str:
        if self.size is not None:
            return f"{self.name} fixed at {self.size}"
        return f"{self.low} <= {self.name}" + ("" if self.high is None else f" <= {self.high}")


def sample_input(size: int | tuple[int, int], image: Path | None = None, seed: int = 0) -> Tensor:
    """A (1, 3, h, w) network input: ``image`` (read and resized as examples/predict.py does),
    or a seeded random grey image, both normalised by the checkpoint's EvalTransform."""
    if image is None:
        side = (size, size) if isinstance(size, int) else size
        grey = np.random.default_rng(seed).integers(0, 256, side, dtype=np.uint8)  # (H, W)
    else:
        if not image.is_file():
            raise SystemExit(f"--sample {image}: no such image file")
        try:
            grey = read_image(image)  # (H, W) uint8 luma, as the datasets load images
        except DataError as error:
            raise SystemExit(f"--sample {image}: {error}") from error
    rgb = torch.from_numpy(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))).permute(2, 0, 1)  # (3, H, W)
    no_mask = tv_tensors.Mask(torch.zeros(grey.shape, dtype=torch.uint8))
    return EvalTransform(size)(RawSample(tv_tensors.Image(rgb), no_mask, "sample")).image[None]  # (1, 3, h, w)


def accepted_sides(program: ExportedProgram) -> tuple[Side, Side]:
    """Height and width as the exported graph accepts them: read from its input placeholder,
    an int where the exporter specialised the axis, a symbol with a range where it is dynamic."""
    inputs = program.graph_signature.user_inputs  # the image, not the lifted weights and buffers
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in inputs)
    shape = placeholder.meta["val"].shape  # (1, 3, H, W)
    sides = []
    for name, dim in zip(("H", "W"), shape[2:]):
        expr = dim.node.expr if isinstance(dim, torch.SymInt) else dim
        if isinstance(expr, int) or expr.is_number:  # specialised: a constant, maybe a sympy one
            sides.append(Side(name, int(expr), int(expr), int(expr)))
        elif expr in program.range_constraints:
            bounds = program.range_constraints[expr]
            sides.append(Side(name, None, int(bounds.lower), _finite(bounds.upper)))
        else:  # an expression of other symbols: no range of its own; the checks at two sizes decide
            sides.append(Side(name, None, 1, None))
    return sides[0], sides[1]


def _finite(bound: object) -> int | None:
    # An unbounded axis has torch's integer infinity as upper bound. sympy calls it finite
    # (it is an integer) but cannot convert it, so the conversion is the test.
    try:
        return int(bound)  # type: ignore[call-overload]
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def export_program(model: nn.Module, x: Tensor) -> ExportedProgram:
    """``torch.export`` of ``Logits(model)`` with height and width marked ``Dim.AUTO``: dynamic
    where the model allows it, specialised to ``x``'s size (without an error) where it does not."""
    return torch.export.export(Logits(model).eval(), (x,), dynamic_shapes=({2: Dim.AUTO, 3: Dim.AUTO},))


def missing_onnx_packages() -> list[str]:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _save_onnx(program: ExportedProgram, x: Tensor, path: Path) -> None:
    # external_data=False keeps the weights inside the file (fine under protobuf's 2 GB limit;
    # ResNet-101 is 0.24 GB), so the .onnx is the only file to copy.
    torch.onnx.export(program, (x,), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=["image"], output_names=["logits"])


WRITERS: dict[str, tuple[str, Callable[[ExportedProgram, Tensor, Path], None]]] = {
    "pt2": ("torch.export.save", lambda program, x, path: torch.export.save(program, path)),
    "onnx": ("the ONNX exporter", _save_onnx),
}


def write(kind: str, program: ExportedProgram, fixed: Callable[[], ExportedProgram], x: Tensor, path: Path
          ) -> ExportedProgram:
    """Write ``program`` as ``kind`` (``"pt2"`` or ``"onnx"``) to ``path``. If a dynamic-size
    graph cannot be written (timm's "same" padding, for one, computes ``math.ceil`` of the
    size, which .pt2 cannot serialise), write ``fixed()``, the graph traced at ``x``'s size,
    and say so. Returns the program written."""
    writer, save = WRITERS[kind]
    try:
        save(program, x, path)
        return program
    except Exception as error:  # any failure of the dynamic graph: retry at a fixed size
        if all(side.size is not None for side in accepted_sides(program)):
            raise
        path.unlink(missing_ok=True)  # a half-written archive
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        h, w = x.shape[2:]
        print(f"[export] {writer} cannot write the dynamic-size graph ({reason}); "
              f"{path.name} is traced at the fixed size {h} x {w} instead", flush=True)
    program = fixed()
    save(program, x, path)
    return program


def runner(kind: str, path: Path) -> Callable[[Tensor], Tensor]:
    """The written file, read back: the .pt2 program's module, or an onnxruntime session on CPU."""
    if kind == "pt2":
        module: Callable[[Tensor], Tensor] = torch.export.load(path).module()
        return module
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def describe(sides: tuple[Side, Side], x: Tensor) -> str:
    """What a graph accepts, in words: the dynamic ranges, or the one fixed size to resize to."""
    height, width = sides
    if height.size is None and width.size is None:
        return f"dynamic height and width, {height}, {width} (batch fixed at 1)"
    shape = f"(1, 3, {height.size or 'H'}, {width.size or 'W'})"
    return (f"only {shape} inputs ({height}, {width}): resize images to it first "
            f"(examples/predict.py resizes to the checkpoint's size, {tuple(x.shape[2:])})")


def second_size(height: Side, width: Side, x: Tensor) -> tuple[int, int] | None:
    """Another input size inside the accepted range, odd on purpose, to check a dynamic graph
    away from the size it was traced at; None for a fully fixed graph."""
    if height.size is not None and width.size is not None:
        return None
    sizes = []
    for side, traced, step in ((height, x.shape[2], 13), (width, x.shape[3], 7)):
        if side.size is not None:
            sizes.append(side.size)
        else:
            sizes.append(traced + step if side.high is None or traced + step <= side.high else max(side.low, traced - step))
    return sizes[0], sizes[1]


def check(name: str, run: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, atol: float) -> bool:
    """Run an exported graph and the eager model on ``x``, print the largest absolute logit
    difference, and say whether it is within ``atol``. A graph that refuses ``x`` (a size
    relation the exporter kept as a runtime check, say) fails with its message."""
    with torch.no_grad():
        expected = model(x).logits  # (1, K, H, W)
        try:
            got = run(x)
        except Exception as error:  # onnxruntime and torch.export raise their own types
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            print(f"[export] {name} on {tuple(x.shape)}: FAILED, the graph does not run ({type(error).__name__}: {message})")
            return False
    if got.shape != expected.shape:
        print(f"[export] {name} on {tuple(x.shape)}: FAILED, logits of shape {tuple(got.shape)}, "
              f"the model's are {tuple(expected.shape)}")
        return False
    difference = float((got.float() - expected.float()).abs().max())
    verdict = "ok" if difference <= atol else f"FAILED: above --atol {atol:g}"
    print(f"[export] {name} on {tuple(x.shape)}: largest |logit difference| {difference:.3g} ({verdict})")
    return difference <= atol


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="best.pt, last.pt or average.pt of python -m examples.train_busi")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--format", choices=FORMATS, default="both", help="what to write: both (default), pt2 (torch.export only) or onnx")
    parser.add_argument("--sample", type=Path, default=None, metavar="IMAGE",
                        help="image to trace and check with (default: a seeded random image of the checkpoint's size)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed absolute logit difference from the eager model (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample image (default %(default)s)")
    args = parser.parse_args(argv)

    if not args.atol >= 0:
        raise SystemExit(f"--atol must be >= 0, got {args.atol}")
    if not args.checkpoint.is_file():
        raise SystemExit(f"checkpoint {args.checkpoint}: no such file")
    if args.format != "pt2" and (missing := missing_onnx_packages()):
        raise SystemExit(
            f"ONNX export needs {', '.join(ONNX_PACKAGES)}; {', '.join(missing)} cannot be imported. "
            'Install them with `pip install "cscpa_layers[export]"` (or `pip install onnx onnxscript onnxruntime`), '
            "or write the torch.export program alone with --format pt2."
        )
    out = args.out if args.out is not None else args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)

    model, config = load_trained(args.checkpoint, torch.device("cpu"))  # eval mode, as predict runs it
    size = config.eval_size or config.crop  # what the trainer evaluated with, as in predict
    fpa, epa = model.fpa, model.epa
    print(f"[export] {args.checkpoint}: {config.method}, {config.backbone}, input size {size}")
    print(f"[export] FPA: {'none' if fpa is None else 'eval pairing ' + repr(fpa.eval_pairing)}; EPA: "
          + ("none" if epa is None else "stored edge bank" if bool(epa.container.initialized)
             else "bank never initialised, so EPA passes F through"))
    x = sample_input(size, args.sample, args.seed)
    print(f"[export] sample: {args.sample or f'random image, seed {args.seed}'}, input {tuple(x.shape)}")

    print("[export] tracing with torch.export ...", flush=True)
    started, program = time.perf_counter(), export_program(model, x)
    print(f"[export] traced in {time.perf_counter() - started:.0f} s", flush=True)
    fixed: list[ExportedProgram] = []  # the graph at the sample's size, traced once if needed

    def fixed_program() -> ExportedProgram:
        if not fixed:
            fixed.append(torch.export.export(Logits(model).eval(), (x,)))
        return fixed[0]

    artefacts: list[tuple[str, Path, tuple[Side, Side]]] = []
    kinds = ("pt2", "onnx") if args.format == "both" else (args.format,)
    for kind in kinds:
        path = out / f"{args.checkpoint.stem}.{kind}"
        print(f"[export] writing {path} ...", flush=True)
        started, written = time.perf_counter(), write(kind, program, fixed_program, x, path)
        sides = accepted_sides(written)
        print(f"[export] wrote {path} in {time.perf_counter() - started:.0f} s; it accepts {describe(sides, x)}")
        artefacts.append((kind, path, sides))

    failed = False
    for kind, path, (height, width) in artefacts:
        run = runner(kind, path)  # read back from disk: the check covers the file as written
        inputs = [x]
        other = second_size(height, width, x)
        if other is not None:  # a dynamic graph: check it away from the traced size too
            inputs.append(sample_input(other, args.sample, args.seed))
        for sample in inputs:
            failed |= not check(path.name, run, model, sample, args.atol)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
