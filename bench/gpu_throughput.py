"""GPU throughput of the library's torch paths (no Ray): backbone + head embedding and head
training, bf16 autocast and channels_last, images/s and achieved TFLOP/s against the GPU's peak.

    python bench/gpu_throughput.py --device cuda --out bench/results/gpu.json

Weights are random (speed does not depend on them; a GPU machine without the torch hub cache has
no VGG weights). Runs on CPU with --device cpu --quick for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devise.backbones import load_backbone
from devise.losses import rank_loss
from devise.model import DeviseHead, HeadSpec
from devise.pipeline import forward_images, prepare_for_inference, to_device

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0, "L40S": 362}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """Run fn repeatedly for about `seconds` after a warm-up; returns (elapsed, iterations)."""
    for _ in range(2):
        fn()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        fn()
        iters += 1
        if iters % 5 == 0:
            _sync(device)
    _sync(device)
    return time.perf_counter() - start, iters


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def embed_case(name: str, size: int, batch: int, device: torch.device, seconds: float) -> dict:
    """The embedding path of devise.pipeline (the model actor's preparation and forward:
    channels_last, bf16 autocast, uint8 in): on batches already on the device (the raw forward),
    and on numpy batches copied in through pinned memory each step (what the actor is fed)."""
    backbone = prepare_for_inference(load_backbone(name, random_init=True), device)
    head = DeviseHead(HeadSpec(in_dim=backbone.info.feature_dim, out_dim=300, backbone=name))
    head = head.to(device).eval()
    host = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images = to_device(host, device)

    @torch.inference_mode()
    def step(x=None):
        return forward_images(backbone, head, images if x is None else x)

    flops = count_flops(lambda: step()) / batch
    elapsed, iters = _timed(step, device, seconds)
    ips = batch * iters / elapsed
    elapsed_h, iters_h = _timed(lambda: step(to_device(host, device)), device, seconds)
    return {
        "case": f"embed {name}@{size}",
        "batch": batch,
        "gflop_per_image": flops / 1e9,
        "images_per_s": ips,
        "images_per_s_with_host_copy": batch * iters_h / elapsed_h,
        "tflops": flops * ips / 1e12,
    }


def head_case(in_dim: int, batch: int, classes: int, device: torch.device, seconds: float) -> dict:
    """DeViSE head training steps on cached features (MLP, rank loss over all classes)."""
    head = DeviseHead(HeadSpec(in_dim=in_dim, out_dim=300, kind="mlp")).to(device).train()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    feats = torch.randn(batch, in_dim, device=device, dtype=torch.float16)
    cv = torch.nn.functional.normalize(torch.randn(classes, 300, device=device), dim=1)
    targets = torch.randint(0, classes, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = rank_loss(head(feats.float()), cv, targets)
        loss.backward()
        opt.step()

    flops = count_flops(step) / batch
    elapsed, iters = _timed(step, device, seconds)
    sps = batch * iters / elapsed
    return {
        "case": f"train head mlp {in_dim}->300, {classes} classes",
        "batch": batch,
        "gflop_per_image": flops / 1e9,
        "images_per_s": sps,
        "tflops": flops * sps / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case")
    p.add_argument("--quick", action="store_true", help="tiny batches, 1 s per case (smoke test)")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seconds = 1.0 if args.quick else args.seconds
    big = 4 if args.quick else 256
    cases = []
    plan = [("vgg16_bn", 224, big), ("efficientnet_lite0", 224, big),
            ("efficientnet_lite0", 64, 4 * big)]  # fmt: skip
    for name, size, batch in plan:
        try:
            cases.append(embed_case(name, size, batch, device, seconds))
        except ImportError as e:  # efficientnet-lite-pytorch not installed on this machine
            cases.append({"case": f"embed {name}@{size}", "skipped": str(e)})
        print(json.dumps(cases[-1]), flush=True)
    for in_dim in (4096, 1280):
        cases.append(head_case(in_dim, 64 if args.quick else 8192, 1000, device, seconds))
        print(json.dumps(cases[-1]), flush=True)
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name}, bf16 peak {peak or '?'} TFLOP/s (dense)\n")
    print(
        "| case | batch | GFLOP/img | images/s | images/s incl. host copy | TFLOP/s | % of peak |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cases:
        if "skipped" in c:
            print(f"| {c['case']} | skipped: {c['skipped']} | | | | | |")
            continue
        share = f"{100 * c['tflops'] / peak:.1f}" if peak else "—"
        host = c.get("images_per_s_with_host_copy")
        print(
            f"| {c['case']} | {c['batch']} | {c['gflop_per_image']:.3f} | {c['images_per_s']:,.0f}"
            f" | {f'{host:,.0f}' if host else '—'} | {c['tflops']:.1f} | {share} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": name, "peak_tflops": peak,
                                              "cases": cases}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
