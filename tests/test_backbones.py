import numpy as np
import pytest
import torch
from PIL import Image

from devise import backbones
from devise.backbones import BackboneError, load_backbone, prepare_transform


def test_tiny_backbone_is_frozen_and_deterministic():
    a, b = load_backbone("tiny"), load_backbone("tiny")
    assert all(not p.requires_grad for p in a.parameters())
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    fa, fb = a(x), b(x)
    assert fa.shape == (2, a.info.feature_dim)
    assert torch.equal(fa, fb)


def test_unfreeze_last_makes_only_that_block_trainable():
    bb = load_backbone("tiny")
    params = bb.unfreeze_last()
    trainable = [p for p in bb.parameters() if p.requires_grad]
    assert params and len(trainable) == len(params)
    assert len(trainable) < len(list(bb.parameters()))


def test_unknown_backbone_names_choices():
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        backbones.backbone_info("alexnet9000")


def test_missing_torchvision_weights_is_one_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="--weights"):
        load_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_torchvision_backbone_loads_given_weights_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    bb = load_backbone("resnet18", weights=path)
    out = bb(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (1, 512)
    assert bb.classify(out).shape == (1, 1000)


def test_prepare_transform_resizes_and_augments():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    info = backbones.backbone_info("tiny")
    out = prepare_transform(info, 32)(img)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    gray = Image.fromarray(np.zeros((30, 30), np.uint8)).convert("RGB")
    torch.manual_seed(0)
    aug = prepare_transform(info, 16, augment=True)
    outs = [aug(gray) for _ in range(5)]
    assert all(o.shape == (16, 16, 3) for o in outs)


def test_normalize_accepts_nhwc_and_nchw():
    bb = load_backbone("tiny")
    x = torch.randint(0, 255, (2, 8, 8, 3), dtype=torch.uint8)
    assert torch.allclose(bb.normalize(x), bb.normalize(x.permute(0, 3, 1, 2)))


@pytest.mark.assets
def test_efficientnet_lite0_sees_a_cat_in_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    bb = load_backbone("efficientnet_lite0")
    img = Image.fromarray(skimage_data.chelsea())
    x = torch.from_numpy(prepare_transform(bb.info)(img))[None]
    with torch.no_grad():
        feats = bb(x)
        top5 = bb.classify(feats).topk(5).indices[0].tolist()
    assert feats.shape == (1, 1280)
    names = backbones.imagenet_categories()
    cats = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}
    assert cats & {names[i] for i in top5}, [names[i] for i in top5]


def test_tiny_backbone_loads_fine_tuned_weights(tmp_path):
    tuned = load_backbone("tiny")
    with torch.no_grad():
        for p in tuned.trunk.parameters():
            p.add_(0.5)
    torch.save(tuned.trunk.state_dict(), tmp_path / "tiny.pt")
    again = load_backbone("tiny", weights=tmp_path / "tiny.pt")
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(again(x), tuned(x))
    assert not torch.equal(again(x), load_backbone("tiny")(x))
    assert all(not p.requires_grad for p in again.parameters())


def test_random_init_needs_no_weights_file():
    bb = load_backbone("resnet18", random_init=True)
    assert bb(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 512)


def test_a_new_backbone_is_one_registry_entry(tmp_path):
    """Registering one entry gives load, features, --unfreeze-last, export/import of tuned
    weights and the weights file every stage keys caches on; nothing else names backbones."""
    from torch import nn

    from devise.features import weights_identity

    def network():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.AdaptiveAvgPool2d(1))

    entry = backbones.Backbone(
        backbones.BackboneInfo("toy6", 6, 16),
        network=network,
        split=lambda net: (net, None),
        last_block=lambda trunk: trunk[1],
        export=lambda fb: fb.trunk.state_dict(),
        default_weights=lambda: tmp_path / "toy6.pt",
        weights_source="toy6.pt",
    )
    backbones.register(entry)
    try:
        with pytest.raises(BackboneError, match="No weights for toy6: .* Copy toy6.pt there"):
            load_backbone("toy6")
        torch.save(network().state_dict(), tmp_path / "toy6.pt")
        bb = load_backbone("toy6")
        x = torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8)
        assert bb(x).shape == (2, 6)
        tuned = bb.unfreeze_last()
        assert [p.shape for p in tuned] == [p.shape for p in bb.trunk[1].parameters()]
        with torch.no_grad():
            tuned[0].add_(1.0)
        torch.save(backbones.export_weights(bb), tmp_path / "tuned.pt")
        again = load_backbone("toy6", tmp_path / "tuned.pt")
        torch.testing.assert_close(again(x), bb(x))
        assert weights_identity("toy6", None)["file"] == str((tmp_path / "toy6.pt").resolve())
    finally:
        del backbones.BACKBONES["toy6"]


def test_resnet_unfreeze_last_trains_layer4():
    bb = load_backbone("resnet18", random_init=True)
    params = bb.unfreeze_last()
    layer4 = list(bb.trunk[7].parameters())
    assert params and len(params) == len(layer4)
    assert all(a is b for a, b in zip(params, layer4))


def test_no_switch_on_backbone_names_outside_the_registry():
    """Variation lives in the registry: no `== "vgg16_bn"`-style test of a backbone name."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    names = "|".join(re.escape(n) for n in backbones.BACKBONES)
    switch = re.compile(rf"""(==|!=|startswith\()\s*["']({names}|resnet)["']""")
    found = [
        f"{p.relative_to(repo)}:{i}"
        for p in [*repo.glob("devise/*.py"), *repo.glob("bench/*.py"), *repo.glob("jobs/*.py")]
        if p.name != "backbones.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if switch.search(line)
    ]
    assert found == []
