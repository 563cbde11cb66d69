"""Ray Data image pipeline shared by feature extraction and embedding.

paths table -> many blocks -> decode + resize in CPU tasks -> frozen backbone (+ head) in an actor
pool -> numpy batches back to the caller. A file that cannot be decoded keeps its row, with an
`error` reason and no output, so callers record it instead of losing it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from devise.backbones import backbone_info, load_backbone, prepare_transform
from devise.config import PipelineConfig
from devise.images import ImageDecodeError, decode_image, read_file_bytes

if TYPE_CHECKING:  # pandas is not needed to run the model (bench/gpu.sh machines lack it)
    import pandas as pd


def _view_seed(path: str, view: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{view}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def decode_batch(
    batch: dict[str, np.ndarray],
    backbone: str,
    image_size: int | None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode each `path`, resize/crop to uint8 (B, S, S, 3).

    Rows with `view` > 0 get the notebook's augmentation, seeded by (path, view, seed) so a
    rerun computes the same views. Failed rows get an all-zero image and an `error` reason.
    """
    info = backbone_info(backbone)
    size = image_size or info.image_size
    plain = prepare_transform(info, size)
    augmented = prepare_transform(info, size, augment=True)
    paths = batch["path"]
    views = batch["view"] if "view" in batch else np.zeros(len(paths), dtype=np.int64)
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors = np.empty(len(paths), dtype=object)
    for i, (path, view) in enumerate(zip(paths, views)):
        try:
            img = decode_image(read_file_bytes(path))
            if view > 0:
                torch.manual_seed(_view_seed(str(path), int(view), seed))
                images[i] = augmented(img)
            else:
                images[i] = plain(img)
            errors[i] = ""
        except ImageDecodeError as e:
            errors[i] = str(e)
        except Exception as e:  # noqa: BLE001 -- a decoder bug on one file must not stop the job
            errors[i] = f"{type(e).__name__}: {e}"
    out = dict(batch)
    out["image"] = images
    out["error"] = errors.astype(str)
    return out


def fold_batchnorm(model: torch.nn.Module, probe: torch.Tensor) -> int:
    """Fold every BatchNorm2d that reads a Conv2d's output straight into that convolution (in
    eval mode BN is a per-channel affine map, so conv weights absorb it exactly), in place.

    The pairs are found by running `probe` once with hooks, so no model needs a table of its
    layers; the result is checked against the unfolded output on the probe and undone if it
    differs. Returns the number of BatchNorm layers folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    produced: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []

    def conv_hook(m, args, out):
        produced[id(out)] = (m, out)  # the tensor is kept so its id is not reused

    def bn_hook(m, args, out):
        conv = produced.get(id(args[0]))
        if conv is not None and conv[1] is args[0]:
            pairs.append((conv[0], m))

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else bn_hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
    ]
    try:
        with torch.inference_mode():
            want = model(probe)
    finally:
        for h in hooks:
            h.remove()
    produced.clear()
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    names = {m: n for n, m in model.named_modules()}
    undo: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for conv, bn in pairs:
        if convs.count(conv) != 1 or bns.count(bn) != 1:  # a layer used twice: leave it
            continue
        for name, new in ((names[conv], fuse_conv_bn_eval(conv, bn)), (names[bn], None)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            undo.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new if new is not None else torch.nn.Identity())
    with torch.inference_mode():
        got = model(probe)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6):
        for parent, child, old in reversed(undo):
            setattr(parent, child, old)
        return 0
    return len(undo) // 2


def prepare_for_inference(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen backbone as every executor and the benches run it: BatchNorm folded into the
    convolutions, on device, eval mode, weights in channels_last (the layout FrozenBackbone
    feeds its trunk, so convolutions need no reorder)."""
    size = max(32, getattr(getattr(module, "info", None), "image_size", 64) // 4)
    probe = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    fold_batchnorm(module.eval(), probe)
    return module.to(device).to(memory_format=torch.channels_last)


def forward_images(
    backbone: torch.nn.Module, head: torch.nn.Module | None, images: torch.Tensor
) -> torch.Tensor:
    """uint8 images (B, S, S, 3) already on the model's device -> float32 (B, F) backbone
    features, or (B, D) head embeddings. bf16 autocast on CUDA; call under inference_mode."""
    device = images.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        feats = backbone(images)
    feats = feats.float()
    return head(feats) if head is not None else feats


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8 numpy batch as a tensor on device: no copy on CPU (Ray's batches are read-only
    views of the object store, which torch only reads here); through pinned memory on CUDA."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(images)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


class ModelActor:
    """Ray Data actor: frozen backbone (+ optional DeViSE head) on uint8 image batches.

    Loads the model once in __init__; __call__ replaces the `image` column with `feature`
    (float16 backbone features) or `embedding` (float32, L2-normalised head output), and under
    Ray adds `node`, the Ray node that ran the model (which nodes a job used).

    engine: "onnx" runs the backbone on onnxruntime (devise.engines.OnnxBackbone; CPU only),
    "torch" on torch, "auto" picks onnx on the CPU and torch on a GPU. The head stays on torch
    (a small matrix product). Both engines give the same features to cosine 0.9999 (tested).
    """

    def __init__(
        self,
        backbone: str,
        weights: str | None = None,
        head_dir: str | None = None,
        device: str = "cpu",
        torch_threads: int | None = None,
        engine: str = "auto",
        image_size: int | None = None,
    ) -> None:
        from devise.engines import OnnxBackbone, choose_engine

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.engine = choose_engine(engine, self.device.type != "cpu").name
        if self.engine == "onnx":
            # torch's thread count already reflects --torch-threads or Ray's per-actor CPUs.
            threads = torch_threads or torch.get_num_threads()
            self.backbone = OnnxBackbone(backbone, weights, image_size, threads)
        else:
            self.backbone = prepare_for_inference(load_backbone(backbone, weights), self.device)
        self.head = None
        if head_dir is not None:
            from devise.model import load_model

            self.head = load_model(head_dir).to(self.device).eval()
        self.out_dim = self.head.spec.out_dim if self.head else self.backbone.info.feature_dim
        ray = sys.modules.get("ray")  # not imported: not under Ray (the local executor)
        self.node = (
            ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
        )

    def forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> float32 (B, F) features or (B, D) head embeddings."""
        if self.engine == "onnx":
            feats = self.backbone(images)
            if self.head is None:
                return feats
            return self.head(torch.from_numpy(feats)).numpy()
        return (
            forward_images(self.backbone, self.head, to_device(images, self.device)).cpu().numpy()
        )

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = batch["error"] == ""
        name = "embedding" if self.head is not None else "feature"
        dtype = np.float32 if self.head is not None else np.float16
        if self.node is not None:
            batch["node"] = np.full(len(ok), self.node)
        if ok.all():
            batch[name] = self.forward(images).astype(dtype, copy=False)
            return batch
        out = np.zeros((len(images), self.out_dim), dtype=dtype)
        if ok.any():
            out[ok] = self.forward(np.ascontiguousarray(images[ok])).astype(dtype)
        batch[name] = out
        return batch


def build_dataset(table: pd.DataFrame, config: PipelineConfig, seed: int = 0):
    """The lazy Ray Dataset: table rows -> decoded images -> model outputs.

    table needs a `path` column; other columns ride along. It is split into many blocks, since
    `from_pandas` alone makes one block and so keeps only one actor busy.
    """
    import ray

    n = len(table)
    blocks = config.blocks or max(
        1, min(n, max(4 * config.resources.num_workers, math.ceil(n / 256)))
    )
    # Split here: from_pandas(override_num_blocks=) splits with np.array_split, which calls the
    # deprecated DataFrame.swapaxes (a FutureWarning on every run).
    table = table.reset_index(drop=True)
    cuts = np.linspace(0, n, blocks + 1).astype(int)
    ds = ray.data.from_pandas([table.iloc[a:b] for a, b in itertools.pairwise(cuts) if b > a])
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"backbone": config.backbone, "image_size": config.image_size, "seed": seed},
        batch_size=config.resources.batch_size,
        batch_format="numpy",
        num_cpus=config.resources.decode_cpus,
    )
    gpu = config.resources.gpus_per_worker if config.resources.use_gpu else 0
    ds = ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "backbone": config.backbone,
            "weights": config.weights,
            "head_dir": config.head_dir,
            "device": "cuda" if config.resources.use_gpu else "cpu",
            "torch_threads": config.torch_threads,
            "engine": config.resources.engine,
            "image_size": config.image_size,
        },
        batch_size=config.resources.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.resources.num_workers),
        num_cpus=config.resources.cpus_per_worker,
        num_gpus=gpu,
    )
    return ds


def run_images(
    table: pd.DataFrame, config: PipelineConfig, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Stream model outputs for every row of table as numpy batches (any order).

    Each batch has the table's columns plus `error` ('' when fine) and `feature` or
    `embedding`. Every input row comes back exactly once.
    """
    if len(table) == 0:
        return
    ds = build_dataset(table, config, seed)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
