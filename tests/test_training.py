"""Training job: 2-worker Ray Train DDP on tiny data, outputs, kill + resume, online mode."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLASSES, write_class_tree, write_vec
from train_child import stop_after_first_epoch

from devise import checkpoints, config, runs, train_inputs, train_loops
from devise import training as T
from devise.catalog import build_catalog, write_catalog
from devise.commands import train as train_cmd
from devise.model import load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict:
    """5 colour classes x 6 images, 'ship' held out; a seeded .vec; one feature cache shared by
    the tests of this module (so the backbone runs once)."""
    base = tmp_path_factory.mktemp("train-inputs")
    root = write_class_tree(base / "images")
    catalog = write_catalog(
        build_catalog(root, test_fraction=0.34, holdout=["ship"], seed=0), base / "catalog.parquet"
    )
    vec = base / "tiny.vec"
    words = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]
    write_vec(vec, words, dim=8, seed=1)
    return {"catalog": catalog, "vectors": vec, "cache": base / "features", "base": base}


def _argv(inputs: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--catalog", str(inputs["catalog"]), "--out", str(out), "--vectors", str(inputs["vectors"]),
        "--backbone", "tiny", "--image-size", "32", "--batch-size", "8", "--lr", "0.01",
        "--num-workers", "2", "--cpus-per-worker", "0.5", "--embed-workers", "1",
        "--decode-cpus", "0.5", "--feature-cache", str(inputs["cache"]), "--head", "mlp", *extra,
    ]  # fmt: skip


def _config(inputs: dict, out: Path, **kw) -> config.TrainConfig:
    import argparse
    import dataclasses

    from devise.commands.train import add_train_args

    p = argparse.ArgumentParser()
    add_train_args(p)
    return dataclasses.replace(train_cmd.config_from_args(p.parse_args(_argv(inputs, out))), **kw)


# --------------------------------------------------------------------------------------------
# No Ray needed


def test_user_errors_are_one_sentence(tiny_inputs: dict, tmp_path: Path, capsys) -> None:
    cases = [
        ({"catalog": str(tmp_path / "nope.parquet")}, "does not exist"),
        ({"loss": "hinge"}, "Unknown loss"),
        ({"unfreeze_last": True}, "needs --mode online"),
        ({"vectors": str(tmp_path / "none.vec")}, "does not exist"),
        ({"backbone": "alexnet"}, "Unknown backbone"),
        (
            {"precision": "fp8"},
            r"^Unknown precision 'fp8'; choose one of auto, fp32, bf16, fp16\.$",
        ),
    ]
    for kw, match in cases:
        with pytest.raises(Exception, match=match) as info:
            T.train(_config(tiny_inputs, tmp_path / "run", **kw))
        assert "\n" not in str(info.value)
    only_test = tmp_path / "test_only.parquet"
    df = pd.read_parquet(tiny_inputs["catalog"])
    df.assign(split="test").to_parquet(only_test)
    with pytest.raises(runs.TrainError, match="no training rows"):
        T.train(_config(tiny_inputs, tmp_path / "run", catalog=str(only_test)))
    # Through the job entry point: exit code 2 and one line on stderr, no traceback.
    code = _load_job().main(_argv(tiny_inputs, tmp_path / "run", "--loss", "hinge"))
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "python jobs/train.py: error: Unknown loss 'hinge'; choose 'rank' or 'cosine'."
    )


def test_select_rows_and_training_classes(tiny_inputs: dict) -> None:
    from devise.vectors import load_vectors

    df = pd.read_parquet(tiny_inputs["catalog"])
    sub = train_inputs.select_rows(df, max_train_per_class=2, seed=0)
    assert sub[sub["split"] == "train"].groupby("label").size().max() == 2
    assert (sub["split"] != "train").sum() == (df["split"] != "train").sum()
    assert train_inputs.select_rows(df, 2, seed=0).equals(sub)  # deterministic
    classes = train_inputs.training_classes(sub, load_vectors(tiny_inputs["vectors"]))
    assert "ship" not in classes.keys  # held out: never a training class
    assert sorted(classes.keys) == sorted(set(TINY_CLASSES) - {"ship"})
    np.testing.assert_allclose(np.linalg.norm(classes.matrix, axis=1), 1.0, rtol=1e-5)


def test_epoch_indices_equal_steps_and_cover_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = train_loops._epoch_indices(5, steps=3, batch=4, gen=gen)
    assert len(idx) == 12 and set(idx.tolist()) == set(range(5))
    idx = train_loops._epoch_indices(10, steps=2, batch=4, gen=gen)
    assert len(idx) == 8 and len(set(idx.tolist())) == 8  # no repeats within one pass


def test_hits_counts_top1_and_top5() -> None:
    classes = torch.eye(6)
    pred = torch.tensor([[1.0, 0.5, 0, 0, 0, 0], [0.9, 1.0, 0.8, 0.7, 0.6, 0.0]])
    assert train_loops._hits(pred, classes, torch.tensor([0, 0])) == (1, 2)
    assert train_loops._hits(pred, classes, torch.tensor([1, 5])) == (0, 1)


def test_metrics_writer_appends_each_epoch_once(tmp_path: Path) -> None:
    w = runs.MetricsWriter(str(tmp_path / "metrics.jsonl"))
    w.after_report(None, [{"epoch": 1, "x": 1.0}, {"epoch": 1, "x": 9.0}], None)
    w.after_report(None, [{"epoch": 2, "x": 2.0}], None)
    w2 = runs.MetricsWriter(str(tmp_path / "metrics.jsonl"))  # a rerun's writer
    w2.after_report(None, [{"epoch": 2, "x": 5.0}], None)
    rows = runs.read_metrics(tmp_path)
    assert [(r["epoch"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0)]


def test_plot_losses_writes_png(tmp_path: Path) -> None:
    metrics = [
        {"epoch": e, "test_loss": 1.0 / e, "batch_losses": list(np.linspace(1, 0.5, 20) / e)}
        for e in (1, 2, 3)
    ]
    out = runs.plot_losses(metrics, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_backbone_round_trips_through_load_backbone(tmp_path: Path) -> None:
    """A tuned Lite0 saved by training loads with load_backbone(weights=...) unchanged."""
    from devise.backbones import export_weights, load_backbone

    try:
        fb = load_backbone("efficientnet_lite0")
    except Exception as e:  # noqa: BLE001 -- the embedded weights are an optional asset here
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {e}")
    params = fb.unfreeze_last()
    with torch.no_grad():
        params[0].add_(0.5)
    path = tmp_path / "backbone.pt"
    torch.save(export_weights(fb), path)
    again = load_backbone("efficientnet_lite0", path)
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fb(x))


def test_training_on_one_class_is_refused(tiny_inputs: dict, tmp_path: Path, capsys) -> None:
    df = pd.read_parquet(tiny_inputs["catalog"])
    one = tmp_path / "one_class.parquet"
    df.assign(split=np.where(df["label"] == "cat", df["split"], "unseen")).to_parquet(one)
    code = _load_job().main(_argv({**tiny_inputs, "catalog": one}, tmp_path / "run"))
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "python jobs/train.py: error: Only one training class (cat) has a word vector; "
        "training needs at least two (check --holdout and the vectors)."
    )


class _Shell:
    """A pickled callable: unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_carrying_code_is_refused_and_never_run(
    tiny_inputs: dict, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    config = _config(tiny_inputs, out)
    ckpt = out / "checkpoints" / runs.run_name(config) / "epoch_0001"
    ckpt.mkdir(parents=True)
    state = ckpt / checkpoints.STATE_FILE
    torch.save({"epoch": 1, "head": _Shell(f"touch {marker}")}, state)

    with pytest.raises(checkpoints.CheckpointError, match="pickled code"):
        checkpoints.read_state(state)
    code = _load_job().main(_argv(tiny_inputs, out))
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"python jobs/train.py: error: Checkpoint {state} holds more than tensors "
        "(pickled code) and was refused; delete it or pass a new --out."
    )
    assert not marker.exists()
    # The file really carries code: the unsafe load the project no longer does runs it.
    torch.load(state, weights_only=False)
    assert marker.exists()


def test_restore_loads_modules_optimizer_and_grad_scaler() -> None:
    """The one resume step both batch sources share, GradScaler included."""
    head = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    head(torch.ones(1, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = {
        "epoch": 4,
        "head": head.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
    }
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    assert checkpoints.restore(state, {"head": fresh}, fresh_opt, fresh_scaler) == 5
    assert torch.equal(fresh.weight, head.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert fresh_scaler.get_scale() == 1024.0
    assert checkpoints.restore(None, {"head": fresh}, fresh_opt, fresh_scaler) == 1


def test_loop_config_is_typed_and_checkpoints_load_weights_only(tmp_path: Path) -> None:
    """The driver hands workers a dataclass; a worker's checkpoint state (optimizer, scaler,
    spec) round-trips through torch.load(weights_only=True)."""
    import dataclasses

    assert dataclasses.is_dataclass(train_loops.LoopConfig)
    head = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(head.parameters())
    head(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        "epoch": 1,
        "head": head.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "spec": {"in_dim": 3, "class_keys": ["a"], "backbone_weights": None},
    }
    torch.save(state, tmp_path / "state.pt")
    again = checkpoints.read_state(tmp_path / "state.pt")
    assert again["epoch"] == 1 and again["spec"] == state["spec"]
    (tmp_path / "cut.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:200])
    with pytest.raises(checkpoints.CheckpointError, match="cut.pt cannot be read"):
        checkpoints.read_state(tmp_path / "cut.pt")


class _FakeTrain:
    """Stands in for ray.train inside one worker: shards from arrays, reports kept in memory
    (each checkpoint's state read back weights_only), so the loop runs in-process in seconds."""

    def __init__(self, shards: dict, checkpoint_dir: Path | None = None) -> None:
        self.shards = shards
        self.checkpoint_dir, self.metrics, self.states = checkpoint_dir, [], []

    def install(self, monkeypatch) -> None:
        import contextlib

        import ray.train
        import ray.train.torch

        fake = self

        class Shard:
            def __init__(self, batch):
                self.batch = batch

            def iter_batches(self, **kw):
                yield self.batch

        class Ckpt:
            def __init__(self, d):
                self.d = d

            @contextlib.contextmanager
            def as_directory(self):
                yield self.d

        def report(metrics, checkpoint=None, checkpoint_dir_name=None):
            fake.metrics.append(metrics)
            if checkpoint is not None:
                fake.states.append(checkpoints.read_state(Path(checkpoint.path) / "state.pt"))

        ctx = type("Ctx", (), {"get_world_rank": lambda s: 0, "get_world_size": lambda s: 1})
        monkeypatch.setattr(ray.train, "get_context", lambda: ctx())
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda n: Shard(fake.shards[n]))
        monkeypatch.setattr(ray.train, "report", report)
        ckpt = None if self.checkpoint_dir is None else Ckpt(self.checkpoint_dir)
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ckpt)
        monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m, **kw: m)


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_one_loop_skeleton_runs_and_resumes_both_sources(
    mode: str, tiny_inputs: dict, tmp_path: Path, monkeypatch
) -> None:
    """The same epoch skeleton over cached features and over images; a second run given the
    first one's checkpoint starts at the next epoch with the saved weights."""
    from devise.model import HeadSpec

    df = pd.read_parquet(tiny_inputs["catalog"])
    keys = sorted(set(df.loc[df["split"] == "train", "label"]))
    index = {k: i for i, k in enumerate(keys)}
    classes = torch.nn.functional.normalize(torch.randn(len(keys), 8), dim=1).numpy()
    spec = HeadSpec(in_dim=64, out_dim=8, kind="linear", backbone="tiny", image_size=32)

    def rows(split):
        part = df[(df["split"] == split) & df["label"].isin(index)]
        return train_loops.Rows(part["path"].tolist(), [index[k] for k in part["label"]])

    rng = np.random.default_rng(0)
    shards = {
        split: {
            "feature": rng.normal(size=(12, 64)).astype(np.float16),
            "target": rng.integers(0, len(keys), 12),
        }
        for split in ("train", "test")
    }
    if mode == "cached":
        source = train_loops.CachedFeatures(mean=np.zeros(64), std=np.ones(64))
    else:
        source = train_loops.OnlineImages("tiny", None, 32, rows("train"), rows("test"), True)
    cfg = train_loops.LoopConfig(
        spec=dataclasses.asdict(spec), class_matrix=classes, source=source, epochs=2,
        batch_size=4, lr=0.01, weight_decay=0.0, loss="rank", margin=0.1, seed=0,
        precision="auto",
    )  # fmt: skip
    first = _FakeTrain(shards)
    first.install(monkeypatch)
    train_loops.train_loop(dataclasses.replace(cfg, epochs=1))
    assert [m["epoch"] for m in first.metrics] == [1]
    assert np.isfinite(first.metrics[0]["train_loss"]) and first.metrics[0]["test_count"] > 0
    assert ("decode_errors" in first.metrics[0]) == (mode == "online")
    assert ("backbone" in first.states[0]) == (mode == "online")  # tuned block saved

    ckpt = tmp_path / "epoch_0001"
    ckpt.mkdir()
    torch.save(first.states[0], ckpt / checkpoints.STATE_FILE)
    second = _FakeTrain(shards, ckpt)
    second.install(monkeypatch)
    train_loops.train_loop(cfg)
    assert [(m["epoch"], m["start_epoch"]) for m in second.metrics] == [(2, 2)]
    assert (
        second.states[0]["optimizer"]["state"][0]["step"]
        > first.states[0]["optimizer"]["state"][0]["step"]
    )


# --------------------------------------------------------------------------------------------
# Ray Train fits (each ~20-60 s here)


@pytest.mark.timeout(480)
def test_two_worker_training_end_to_end_survives_kill(
    tiny_inputs: dict, tmp_path: Path, ray_session
):
    """`python jobs/train.py` with 2 DDP workers on CPU: SIGKILL its driver after epoch 1's
    checkpoint, rerun the same command; it continues at epoch 2 instead of starting over and
    writes every output of a finished run."""
    out = tmp_path / "run"
    argv = _argv(tiny_inputs, out, "--epochs", "3", "--augment-views", "1")
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, T.PAUSE_ENV: "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 -- closed in finally, after the kill
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train.py"), *argv, "--address", address],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.time() + 360
        while time.time() < deadline and not runs.read_metrics(out):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        first = runs.read_metrics(out)
        assert [m["epoch"] for m in first] == [1], (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (out / "model").exists()  # the first run did not finish
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "checkpoints" / cfg["run_name"] / "epoch_0001").is_dir()

    # The same command again (in-process, on the same cluster).
    assert _load_job().main([*argv, "--address", address]) == 0
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[0] == first[0]  # epoch 1 was not trained again
    assert [m["start_epoch"] for m in metrics] == [1, 2, 2]  # resumed, not restarted
    assert all(m["time"] > killed_at for m in metrics[1:])

    # Everything a finished run leaves behind.
    for m in metrics:
        assert m["world_size"] == 2 and m["test_count"] > 0
        assert np.isfinite(m["train_loss"]) and np.isfinite(m["test_loss"])
        assert 0.0 <= m["test_hit1"] <= m["test_hit5"] <= 1.0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["backbone"] == "tiny" and cfg["image_size"] == 32
    assert Path(cfg["features"]["path"]).parent == tiny_inputs["cache"]
    ckpts = sorted(p.name for p in (out / "checkpoints" / cfg["run_name"]).glob("epoch_*"))
    assert ckpts == ["epoch_0002", "epoch_0003"]  # --keep-checkpoints 2
    head = load_model(out / "model")
    spec = head.spec
    assert spec.backbone == "tiny" and spec.image_size == 32 and spec.kind == "mlp"
    assert spec.vectors == str(tiny_inputs["vectors"]) and spec.vectors_id
    assert sorted(spec.class_keys) == sorted(set(TINY_CLASSES) - {"ship"})  # no unseen class
    assert not torch.allclose(head.feat_std, torch.ones_like(head.feat_std))  # stats were set
    assert torch.allclose(head(torch.randn(3, spec.in_dim)).norm(dim=1), torch.ones(3))
    assert np.load(out / "class_vectors.npy").shape == (len(spec.class_keys), 8)

    # --local continues the same run in this process (one worker, the cached features): the
    # same spec and text space as the Ray Train model, and epoch 4 starts from epoch 3's state.
    i = argv.index("--num-workers")
    local_argv = [*argv[:i], *argv[i + 2 :], "--epochs", "4", "--local"]
    assert _load_job().main(local_argv) == 0
    metrics = runs.read_metrics(out)
    assert [(m["epoch"], m["start_epoch"], m["world_size"]) for m in metrics[2:]] == [
        (3, 2, 2),
        (4, 4, 1),
    ]
    assert dataclasses.asdict(load_model(out / "model").spec) == dataclasses.asdict(spec)

    # A rerun with other settings into the same RUN_DIR is refused, outputs untouched.
    with pytest.raises(runs.TrainError, match="other settings"):
        T.train(_config(tiny_inputs, out, lr=0.5))


@pytest.mark.timeout(600)
def test_sigterm_stops_training_cleanly_and_a_rerun_resumes(
    tiny_inputs: dict, tmp_path: Path, ray_session
):
    """SIGTERM one second after epoch 1's checkpoint: the job stops with exit code 143 and one
    line (no C-level abort), and the same command resumes at epoch 2. How fast it stops is
    measured, not asserted."""
    out = tmp_path / "run"
    argv = _argv(tiny_inputs, out, "--epochs", "3")
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), *argv, "--address", address]
    proc, stdout, stderr = stop_after_first_epoch(cmd, out, wait_s=400, settle_s=1.0)
    assert proc.returncode == 143, stderr[-3000:]
    # "after epoch N" when the driver had heard of a finished epoch before the signal came.
    assert re.fullmatch(
        r"python jobs/train\.py: error: Stopped by SIGTERM( after epoch 1)?; rerun the same "
        r"command to resume from the latest checkpoint\.",
        # The last line of the command's own (Ray's forwarded log lines start "(name pid=...)").
        [x for x in stderr.strip().splitlines() if not x.startswith(("(", "\x1b"))][-1],
    ), stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert not (out / "model").exists()

    assert _load_job().main([*argv, "--address", address]) == 0
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["start_epoch"] for m in metrics] == [1, 2, 2]  # resumed from epoch 1's checkpoint


@pytest.mark.timeout(300)
def test_online_mode_fine_tunes_last_block(tiny_inputs: dict, tmp_path: Path, ray_session):
    out = tmp_path / "run"
    argv = _argv(
        tiny_inputs, out, "--mode", "online", "--unfreeze-last", "--epochs", "2",
        "--backbone-lr", "0.05", "--loss", "cosine",
    )  # fmt: skip
    assert _load_job().main(argv) == 0
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["decode_errors"] == 0 and m["world_size"] == 2 for m in metrics)
    spec = load_model(out / "model").spec
    assert spec.backbone_weights == str(out / "model" / "backbone.pt")
    tuned = torch.load(spec.backbone_weights, weights_only=True)
    from devise.backbones import load_backbone

    original = load_backbone("tiny").trunk.state_dict()
    last = "4.weight"  # the last convolution: the block --unfreeze-last trains
    assert not torch.allclose(tuned[last], original[last])
    assert torch.allclose(tuned["0.weight"], original["0.weight"])  # earlier layers frozen
    assert (out / "loss.png").exists()


def _load_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_train", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
