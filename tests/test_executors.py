"""Where the image pipeline runs: the local executor returns what the model gives for every row,
in order, broken files included; the automatic choice follows the cluster and the job size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_class_tree, write_vec

from devise import cli
from devise.config import PipelineConfig, Resources
from devise.executors import choose_executor, local_plan, run_local
from devise.pipeline import ModelActor, decode_batch


def _table(root: Path) -> pd.DataFrame:
    paths = sorted(str(p) for p in root.rglob("*.png"))
    broken = root / "broken.png"
    broken.write_bytes(b"not a png")
    paths.insert(3, str(broken))
    return pd.DataFrame({"path": paths, "row": np.arange(len(paths))})


@pytest.mark.timeout(120)
def test_local_executor_gives_the_models_output_for_every_row_in_order(tmp_path: Path) -> None:
    table = _table(write_class_tree(tmp_path / "images", per_class=3))
    config = PipelineConfig(
        backbone="tiny", resources=Resources(batch_size=4), decode_workers=2, torch_threads=1
    )
    batches = list(run_local(table, config))
    got = {k: np.concatenate([b[k] for b in batches]) for k in ("row", "feature", "error")}
    assert got["row"].tolist() == table["row"].tolist()
    assert got["error"][3].startswith("not an image") and (got["error"] != "").sum() == 1
    assert not got["feature"][3].any()
    # The same model on the same decoded pixels, in one batch in this process.
    model = ModelActor("tiny", torch_threads=1)
    decoded = decode_batch({"path": table["path"].to_numpy()}, "tiny", None)
    want = model(decoded)["feature"]
    np.testing.assert_allclose(got["feature"].astype(np.float32), want, atol=2e-3)
    assert np.abs(want[got["error"] == ""]).sum(axis=1).min() > 0


def test_local_executor_with_nothing_to_do_yields_nothing() -> None:
    assert list(run_local(pd.DataFrame({"path": []}), PipelineConfig(backbone="tiny"))) == []


def test_local_plan_gives_the_model_the_idle_cores() -> None:
    assert local_plan(PipelineConfig(), cpus=2, load=0.3) == (1, 2)
    assert local_plan(PipelineConfig(), cpus=16, load=0.0) == (4, 16)
    assert local_plan(PipelineConfig(), cpus=16, load=5.5) == (4, 11)
    # A machine busy with other work: one thread, not threads waiting on each other.
    assert local_plan(PipelineConfig(), cpus=2, load=30.0) == (1, 1)
    assert local_plan(PipelineConfig(decode_workers=3, torch_threads=5), cpus=2) == (3, 5)


def test_auto_executor_is_local_on_one_machine_and_ray_given_a_cluster(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    one = choose_executor("auto", rows=10_000, ray_running=False, cpus=2)
    assert one.name == "local" and "no Ray cluster given" in one.line()
    assert choose_executor("auto", rows=10**7, ray_running=False, cpus=2).name == "local"
    big = choose_executor("auto", rows=10**6, ray_running=False, cpus=64)
    assert big.name == "ray" and "64 cores" in big.reason
    assert choose_executor("auto", 10, address="ray://head:10001").name == "ray"
    gpus = choose_executor("auto", 10, ray_running=False, use_gpu=True, workers=2)
    assert gpus.name == "ray" and "2 GPU workers" in gpus.reason
    assert choose_executor("auto", 10, ray_running=False, use_gpu=True).name == "local"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert "head:8265" in choose_executor("auto", 10, ray_running=False).line()
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_executor("auto", 10, ray_running=True).name == "ray"
    forced = choose_executor("ray", 10, ray_running=False)
    assert forced.name == "ray" and forced.line() == "executor: ray (--executor ray)"
    assert choose_executor("local", 10, address="ray://head:10001").name == "local"
    with pytest.raises(ValueError, match="--executor must be one of"):
        choose_executor("threads")


@pytest.mark.timeout(120)
def test_embed_cli_says_which_executor_ran(tmp_path: Path, capsys, monkeypatch) -> None:
    from devise.model import DeviseHead, HeadSpec, save_model
    from devise.store import read_manifest
    from devise.vectors import load_vectors

    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    vec = tmp_path / "tiny.vec"
    write_vec(vec, ["cat", "dog", "car", "ship", "ankle", "boot"], dim=8, seed=1)
    torch.manual_seed(0)
    spec = HeadSpec(in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec),
                    vectors_id=load_vectors(vec).vectors_id)  # fmt: skip
    model = save_model(tmp_path / "model", DeviseHead(spec).eval())
    tree = write_class_tree(tmp_path / "images", per_class=2)
    out = tmp_path / "emb"
    args = ["embed", "--model", str(model), "--images", str(tree), "--out", str(out)]
    assert cli.main([*args, "--executor", "local", "--batch-size", "3"]) == 0
    printed = capsys.readouterr().out
    assert "executor: local (--executor local)" in printed
    assert read_manifest(out).rows == 10


def test_batchnorm_folds_into_the_convolutions_without_changing_the_output() -> None:
    import copy

    from devise.backbones import load_backbone
    from devise.pipeline import fold_batchnorm

    torch.manual_seed(0)
    backbone = load_backbone("efficientnet_lite0", random_init=True)
    for m in backbone.modules():  # stats a trained network would have, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    eager = copy.deepcopy(backbone)
    images = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    assert fold_batchnorm(backbone, images[:2]) == 49
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    with torch.inference_mode():
        want, got = eager(images), backbone(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fold_batchnorm(load_backbone("tiny"), images[:2]) == 0  # no BatchNorm to fold
