"""The reference DeepLabv3+: shapes for every backbone and stride, the F' fusion, weights, export."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from examples.models.backbones import BACKBONES, ResNetBackbone, dilate_layer
from examples.models.deeplab import DeepLabV3Plus, SegmentationOutput


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(**kwargs: object) -> DeepLabV3Plus:
    options: dict[str, object] = {"backbone": "resnet18", "pretrained": False, "dropout": 0.0}
    options.update(kwargs)
    return DeepLabV3Plus(**options)  # type: ignore[arg-type]


def _conv_config(net: nn.Module) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    return [(name, m.stride, m.dilation, m.padding) for name, m in net.named_modules()  # type: ignore[misc]
            if isinstance(m, nn.Conv2d)]


# --- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes_for_every_backbone_and_stride(backbone: str, output_stride: int) -> None:
    model = DeepLabV3Plus(3, backbone=backbone, output_stride=output_stride, pretrained=False).eval()
    x = torch.randn(1, 3, 35, 45)  # odd sizes on purpose
    with torch.no_grad():
        low, high = model.backbone(x)
        out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (1, 3, 35, 45) and out.logits.dtype == torch.float32
    assert out.low_res_logits.shape == (1, 3, 9, 12)  # ceil(H / 4), ceil(W / 4)
    assert out.features.shape == (1, 512, 9, 12)  # 512 channels at stride 4
    assert low.shape[-2:] == (9, 12)
    expected = {8: (5, 6), 16: (3, 3)}[output_stride]  # ceil(H / os), ceil(W / os)
    assert high.shape[-2:] == expected and high.shape[1] == model.backbone.high_channels


def test_output_stride_32_and_training_batch() -> None:
    model = _small(output_stride=32, fpa=True, epa=True)
    out = model(torch.randn(4, 3, 64, 64))  # training: FPA pairs the halves
    assert out.logits.shape == (4, 2, 64, 64) and out.features.shape == (4, 512, 16, 16)
    assert model.backbone(torch.randn(1, 3, 64, 64))[1].shape[-2:] == (2, 2)


def test_basicblock_dilation_follows_torchvisions_rule() -> None:
    for dilate in ([False, False, True], [False, True, True]):
        theirs = models.resnet50(weights=None, replace_stride_with_dilation=dilate)
        ours = models.resnet50(weights=None)
        rate = 1
        for layer, wanted in zip((ours.layer2, ours.layer3, ours.layer4), dilate):
            if wanted:
                dilate_layer(layer, rate, rate * 2)
                rate *= 2
        assert _conv_config(ours) == _conv_config(theirs)
    backbone = ResNetBackbone("resnet34", 8)
    rates = {m.dilation for m in backbone.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert rates == {(2, 2), (4, 4)}  # first block keeps layer3's rate, the others use 4


# --- the F' fusion ----------------------------------------------------------------------------


def test_features_are_f_plus_ff_plus_fe() -> None:
    torch.manual_seed(0)
    model = _small().train()
    assert model.epa is not None and model.fpa is not None
    model.epa.container.initialize(torch.randn(300, 512))
    x = torch.randn(2, 3, 48, 48)
    out = model(x)
    feats = model.decoder_features(x)  # the same batch statistics, no dropout: deterministic
    expected = model.fpa(feats) + model.epa(feats) - feats
    torch.testing.assert_close(out.features, expected)
    torch.testing.assert_close(out.low_res_logits, model.classifier(expected))
    torch.testing.assert_close(out.logits, F.interpolate(out.low_res_logits, size=(48, 48), mode="bilinear",
                                                         align_corners=False))


@pytest.mark.parametrize(("fpa", "epa"), [(False, False), (True, False), (False, True)])
def test_switching_layers_off(fpa: bool, epa: bool) -> None:
    model = _small(fpa=fpa, epa=epa).train()
    assert (model.fpa is None) != fpa and (model.epa is None) != epa
    if model.epa is not None:
        model.epa.container.initialize(torch.randn(300, 512))
    x = torch.randn(2, 3, 40, 40)
    feats = model.decoder_features(x)
    expected = feats
    if model.fpa is not None:
        expected = model.fpa(feats)
    if model.epa is not None:
        expected = model.epa(feats)
    torch.testing.assert_close(model(x).features, expected)


def test_epa_is_identity_until_its_container_is_initialised() -> None:
    model = _small(fpa=False).eval()
    assert model.epa is not None
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        feats = model.decoder_features(x)
        assert torch.equal(model(x).features, feats)
        model.epa.container.initialize(torch.randn(10, 512))
        assert not torch.equal(model(x).features, feats)


def test_partner_goes_to_fpa() -> None:
    model = _small(epa=False).train()
    assert model.fpa is not None
    x = torch.randn(2, 3, 40, 40)
    partner = torch.randn(2, 512, 10, 10)
    out = model(x, partner=partner)
    torch.testing.assert_close(out.features, model.fpa(model.decoder_features(x), partner))
    with torch.no_grad():
        assert not torch.allclose(out.features, model(x).features)  # default: the halves pair


def test_gradient_reaches_fpa_and_epa_parameters() -> None:
    torch.manual_seed(0)
    model = _small().train()
    assert model.fpa is not None and model.epa is not None
    model.epa.container.initialize(torch.randn(300, 512))
    bank = model.epa.container.update(torch.randn(300, 512))  # in the graph through the mixer
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 2, (2, 32, 32))
    out = model(x, edge_bank=bank)
    F.cross_entropy(out.logits, target).backward()
    for name, param in [("fpa.key.weight", model.fpa.key.weight), ("fpa.value.weight", model.fpa.value.weight),
                        ("fpa.out.weight", model.fpa.out.weight),
                        ("epa.container.mixer.weight", model.epa.container.mixer.weight),
                        ("backbone.conv1.weight", model.backbone.conv1.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bad_input() -> None:
    model = _small(fpa=False, epa=False).eval()
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="must be 4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="no FPA"):
        model(torch.randn(1, 3, 32, 32), partner=torch.randn(1, 512, 8, 8))
    with pytest.raises(ValueError, match="no EPA"):
        model(torch.randn(1, 3, 32, 32), edge_bank=torch.randn(256, 512))
    with pytest.raises(ValueError, match="backbone must be one of 'resnet18', 'resnet34'"):
        DeepLabV3Plus(backbone="no_such_net", pretrained=False)
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16, 32\)"):
        DeepLabV3Plus(backbone="resnet18", output_stride=4, pretrained=False)
    with pytest.raises(ValueError, match="odd batch|even batch"):
        _small(epa=False).train()(torch.randn(3, 3, 32, 32))


def test_narrow_decoder_for_cpu_runs() -> None:
    model = _small(low_level_channels=48, aspp_channels=64, head_channels=32).train()
    assert model.feature_channels == 112 and model.fpa is not None and model.fpa.channels == 112
    assert model.epa is not None and model.epa.channels == 112
    out = model(torch.randn(2, 3, 32, 32))
    assert out.features.shape == (2, 112, 8, 8) and out.logits.shape == (2, 2, 32, 32)


def test_fpa_kv_stride_reaches_the_layer_and_keeps_the_output_shape() -> None:
    model = _small(fpa_kv_stride=2, epa=False).train()
    assert model.fpa is not None and model.fpa.kv_stride == 2
    assert _small(epa=False).fpa.kv_stride == 1  # type: ignore[union-attr]
    assert model(torch.randn(2, 3, 36, 36)).logits.shape == (2, 2, 36, 36)  # odd 9x9 feature map


def test_repr_names_the_configuration() -> None:
    text = repr(_small(output_stride=16, epa=False))
    assert "backbone='resnet18'" in text and "output_stride=16" in text and "fpa=True, epa=False" in text


# --- weights ---------------------------------------------------------------------------------


def test_weights_file_loads_into_the_backbone(tmp_path: Path) -> None:
    source = models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")  # with fc: ignored
    model = _small(weights=tmp_path / "r18.pth")
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, source.bn1.running_var)
    ddp = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": ddp}, tmp_path / "ddp.pth")
    torch.testing.assert_close(_small(weights=tmp_path / "ddp.pth").backbone.conv1.weight, source.conv1.weight)


def test_weights_file_errors_name_the_file(tmp_path: Path) -> None:
    torch.save(models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"r50\.pth is not a resnet18 state_dict"):
        _small(weights=tmp_path / "r50.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
        _small(weights=tmp_path / "missing.pth")


def test_offline_error_names_the_cache_and_the_ways_around(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        DeepLabV3Plus(backbone="resnet18", pretrained=True)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights PATH" in message and "--no-pretrained" in message and "URLError" in message
    # the advice works: a file in the cache is used without any download
    fake = models.resnet18(weights=None)
    torch.save(fake.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = DeepLabV3Plus(backbone="resnet18", pretrained=True, epa=False)
    torch.testing.assert_close(model.backbone.conv1.weight, fake.conv1.weight)


# --- export ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_export_in_eval_mode() -> None:
    model = _small().eval()
    assert model.epa is not None
    model.epa.container.initialize(torch.randn(300, 512))
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
        got = exported.module()(x)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.features, expected.features)
