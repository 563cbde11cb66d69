"""The command line itself: cheap parser, every default shown, one error type, one resource
rule, jobs named in their help, and Ray that starts or says why within seconds."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devise import cli
from devise.errors import DeviseError
from devise.runtime import RayUnavailableError, Resources, ray_address, resolve_resources

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "numpy", "pandas", "pyarrow", "torchvision")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_building_the_parser_imports_neither_torch_nor_ray():
    code = (
        "import json, sys; from devise import cli; cli.build_parser(); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


def test_every_flag_with_a_default_shows_it_in_help():
    parser = cli.build_parser()
    missing = []
    for name, sub in _subparsers(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default in (None, False, argparse.SUPPRESS):
                continue
            if "default" not in formatter._get_help_string(action):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []
    assert "--epochs EPOCHS training epochs (default: 10)" in " ".join(
        _subparsers(parser)["train"].format_help().split()
    )


def test_num_workers_is_the_ray_workers_of_each_ray_stage():
    subs = _subparsers(cli.build_parser())
    for name in ("train", "embed", "evaluate", "demo"):
        group = next(g for g in subs[name]._action_groups if g.title == "Ray resources")
        flags = {s for a in group._group_actions for s in a.option_strings}
        assert {"--num-workers", "--cpus-per-worker", "--address"} <= flags, name
    assert "--local" in {s for a in subs["embed"]._actions for s in a.option_strings}


def test_parser_defaults_are_the_configs():
    """Every flag that sets a config field defaults to that field's default (devise.config)."""
    from dataclasses import MISSING, fields

    from devise import config as C

    subs = _subparsers(cli.build_parser())
    for name, cls in (
        ("train", C.TrainConfig),
        ("evaluate", C.EvalConfig),
        ("embed", C.EmbedConfig),
    ):
        p = subs[name]
        dests = {a.dest for a in p._actions}
        plain = [f for f in fields(cls) if f.name in dests and f.default is not MISSING]
        for f in plain:
            assert p.get_default(f.name) == f.default, (name, f.name)
        # The Resources flags default to the stage's Resources; train's --batch-size is the
        # training batch, so its backbone batch is --feature-batch-size.
        res = next(f.default for f in fields(cls) if f.name == "resources")
        renamed = {"batch_size": "embed_batch_size"} if name == "train" else {}
        for f in fields(C.Resources):
            dest = renamed.get(f.name, f.name)
            if dest in dests:
                assert p.get_default(dest) == getattr(res, f.name), (name, f.name)
        assert len(plain) >= 3, name
    assert subs["demo"].get_default("holdout") == list(C.DEFAULT_HOLDOUT)
    # The store's own defaults are the same ones.
    import inspect

    from devise.store import Store

    embed = subs["embed"]
    writer, gc = (inspect.signature(f).parameters for f in (Store.writer, Store.gc))
    assert embed.get_default("chunk_rows") == writer["chunk_rows"].default
    assert embed.get_default("keep_versions") == gc["keep"].default
    plan = inspect.signature(Store.plan).parameters
    assert embed.get_default("max_error_fraction") == plan["max_error_fraction"].default
    # One default head for train, the demo and the library.
    assert subs["train"].get_default("head") == subs["demo"].get_default("head")
    assert subs["train"].get_default("head") == C.TrainConfig.head == "linear"
    assert subs["embed"].get_default("chunk_rows") == C.DEFAULT_CHUNK_ROWS
    assert subs["embed"].get_default("keep_versions") == C.DEFAULT_KEEP_VERSIONS
    # One number of results per search for the CLI, the demo, the Python API and the service.
    from devise.api import Index

    assert subs["search"].get_default("k") == subs["demo"].get_default("k") == C.DEFAULT_K
    assert inspect.signature(Index.search).parameters["k"].default == C.DEFAULT_K


@pytest.mark.parametrize("job", ["train", "embed", "evaluate", "search"])
def test_a_job_help_names_the_job(job):
    out = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.startswith(f"usage: python jobs/{job}.py ")


def test_every_user_error_class_is_a_devise_error():
    classes = {
        "devise.assets": "AssetError",
        "devise.backbones": "BackboneError",
        "devise.catalog": "CatalogError",
        "devise.evaluate": "EvalError",
        "devise.features": "FeatureError",
        "devise.images": "ImageDecodeError",
        "devise.search": "SearchError",
        "devise.store": "EmbedError",
        "devise.training": "TrainError",
        "devise.vectors": "VectorFileError",
    }
    for module, name in classes.items():
        assert issubclass(getattr(importlib.import_module(module), name), DeviseError), name
    from devise.store import LockHeldError
    from devise.vectors import UnknownWordError

    assert issubclass(UnknownWordError, DeviseError) and LockHeldError.EXIT_CODE == 75


def test_a_devise_error_is_one_line_with_its_exit_code(tmp_path, capsys, monkeypatch):
    class Skipped(DeviseError):
        EXIT_CODE = 75

    def boom(args):
        raise Skipped("Another run holds the lock; try later.")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda *a, **k: parser)
    _subparsers(parser)["catalog"].set_defaults(func=boom)
    assert cli.main(["catalog", str(tmp_path), "--out", str(tmp_path / "c.parquet")]) == 75
    err = capsys.readouterr().err
    assert err == "devise catalog: error: Another run holds the lock; try later.\n"


def test_resources_resolve_one_way_for_the_cluster_size():
    small = resolve_resources(Resources(num_workers=2), total_cpus=2)
    assert (small.cpus_per_worker, small.decode_cpus) == (0.5, 0.5)
    big = resolve_resources(Resources(num_workers=2), total_cpus=64)
    assert (big.cpus_per_worker, big.decode_cpus) == (1.0, 1.0)
    given = resolve_resources(Resources(4, cpus_per_worker=3.0, decode_cpus=0.25), total_cpus=2)
    assert (given.cpus_per_worker, given.decode_cpus, given.num_workers) == (3.0, 0.25, 4)
    # The one check of a stage's width is Resources' own, whoever builds them.
    with pytest.raises(DeviseError, match=r"^--num-workers must be at least 1 \(got 0\)\.$"):
        Resources(num_workers=0)
    with pytest.raises(DeviseError, match=r"^--cpus-per-worker must be above 0 \(got -1.0\)\.$"):
        Resources(cpus_per_worker=-1.0)


def test_an_embed_config_passed_on_as_json_reads_back_equal():
    """Jobs hand an EmbedConfig to a driver as JSON (asdict); its resources come back typed."""
    import json
    from dataclasses import asdict

    from devise.config import EmbedConfig

    config = EmbedConfig(model_dir="m", out="o", resources=Resources(3, 0.5, 0.25, batch_size=8))
    back = EmbedConfig.from_dict(json.loads(json.dumps(asdict(config))))
    assert back == config and isinstance(back.resources, Resources)
    assert EmbedConfig.from_dict({"model_dir": "m", "out": "o"}).resources == EmbedConfig.resources


@pytest.mark.parametrize("stage", ["train", "evaluate", "embed"])
def test_a_zero_width_stage_is_one_sentence_before_anything_starts(stage, tmp_path, capsys):
    need = {
        "train": ["--catalog", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "r")],
        "evaluate": ["--model", str(tmp_path), "--catalog", "c", "--out", str(tmp_path / "e")],
        "embed": ["--model", "m", "--images", str(tmp_path), "--out", str(tmp_path / "emb")],
    }[stage]
    rc = cli.main([stage, *need, "--num-workers", "0", "--address", "local"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"devise {stage}: error: --num-workers must be at least 1 (got 0).\n"


@pytest.mark.parametrize(
    ("flag", "value", "sentence"),
    [
        ("chunk_rows", 0, "--chunk-rows must be at least 1."),
        ("max_error_fraction", 1.5, "--max-error-fraction must be between 0 and 1."),
    ],
)
def test_an_embedding_runs_bounds_are_one_sentence_from_the_cli_and_python(
    flag, value, sentence, tmp_path, capsys
):
    """The config holds the rule: Python gets the sentence the CLI prints, and the CLI prints it
    before it looks for the cluster (the address here is a closed port)."""
    import re

    from devise.config import EmbedConfig
    from devise.errors import DeviseError

    with pytest.raises(DeviseError, match=f"^{re.escape(sentence)}$"):
        EmbedConfig(model_dir="m", out="o", **{flag: value})
    argv = ["embed", "--model", "m", "--images", str(tmp_path), "--out", str(tmp_path / "emb"),
            f"--{flag.replace('_', '-')}", str(value), "--address", f"127.0.0.1:{_closed_port()}"]  # fmt: skip
    rc = cli.main(argv)
    assert rc == 2 and capsys.readouterr().err == f"devise embed: error: {sentence}\n"
    assert not (tmp_path / "emb").exists()


# --- Joining Ray -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with-block ends: nothing listens there


def test_ray_address_sources_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == (None, "no cluster recorded")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1234\n")
    addr, source = ray_address(None)
    assert addr == "127.0.0.1:1234" and "current-cluster file" in source
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert ray_address("10.0.0.2:6379") == ("10.0.0.2:6379", "--address")
    assert ray_address("local") == (None, "--address local")


def _embed_cli(tmp_path, env, *extra):
    args = ["--model", str(tmp_path / "model"), "--images", str(tmp_path), "--out"]
    cmd = [sys.executable, "-m", "devise", "embed", *args, str(tmp_path / "emb"), *extra]
    t0 = time.monotonic()
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False
    )
    return out, time.monotonic() - t0


def test_a_dead_recorded_cluster_fails_in_one_line_within_15_s(tmp_path):
    """A head killed without `ray stop` leaves its address in Ray's current-cluster file; a
    stage says so instead of blocking in ray.init()."""
    port = _closed_port()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)
    out, seconds = _embed_cli(tmp_path, env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == RayUnavailableError.EXIT_CODE, out.stderr
    assert seconds < 15 and len(lines) == 1, out.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "current-cluster file" in lines[0]
    assert "--address local" in lines[0]

    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    out, seconds = _embed_cli(tmp_path, env)
    assert out.returncode == RayUnavailableError.EXIT_CODE and seconds < 15
    assert "from RAY_ADDRESS" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --- Output ----------------------------------------------------------------------------------


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_otherwise(monkeypatch):
    from devise import console

    console.configure(console.NORMAL)
    batches = [{"path": list(range(10))} for _ in range(5)]
    tty = _Stream(tty=True)
    assert list(console.progress(iter(batches), 50, "embedding", stream=tty)) == batches
    assert "50/50" in tty.text and "img/s" in tty.text
    log = _Stream(tty=False)
    list(console.progress(iter(batches), 50, "embedding", stream=log))
    assert log.text == ""  # a fast stage prints no progress line at all
    monkeypatch.setattr(console, "LOG_EVERY_S", 0.0)
    list(console.progress(iter(batches), 50, "embedding", stream=log))
    lines = log.text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("embedding: 10/50 img (")
    assert "\x1b" not in log.text and "ETA" in lines[0]
    console.configure(console.QUIET)
    quiet = _Stream(tty=True)
    list(console.progress(iter(batches), 50, "embedding", stream=quiet))
    assert quiet.text == ""
    console.configure(console.NORMAL)


def test_worker_noise_is_told_from_our_lines():
    from devise.console import is_noise

    assert not is_noise("epoch 3/15  train_loss 0.1234  test_loss 0.2  hit@1 0.870")
    assert not is_noise("Resuming from the checkpoint of epoch 2.")
    for line in (
        "/x/site-packages/ray/data/_internal/x.py:12: DeprecationWarning: use y",
        "  warnings.warn(",
        "[2026-11-30 10:00:01,123 E 123 456] core_worker.cc:512: constructor arguments",
        "2026-11-30 10:00:01,123\tINFO worker.py:1821 -- Started a local Ray instance.",
        "tqdm is not installed. Progress bars will be disabled.",
        "Total Progress: 0/?",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/epoch_0001)",
        "Wrapping provided model in DistributedDataParallel.",
        "Setting up process group for: env:// [rank=0, world_size=2]",
    ):
        assert is_noise(line), line


def test_epoch_lines_every_10_s_on_a_terminal_30_s_in_a_file_and_all_with_verbose(monkeypatch):
    from devise import console

    monkeypatch.setattr(console.sys.stdout, "isatty", lambda: False, raising=False)
    assert console.line_every_s() == console.LOG_EVERY_S == 30.0
    monkeypatch.setattr(console.sys.stdout, "isatty", lambda: True, raising=False)
    assert console.line_every_s() == console.TTY_LINE_EVERY_S == 10.0
    console.configure(console.VERBOSE)
    try:
        assert console.line_every_s() == 0.0
    finally:
        console.configure(console.NORMAL)


@pytest.mark.timeout(300)
def test_a_ray_stage_not_on_a_terminal_prints_no_ansi_codes_and_no_ray_info(tmp_path):
    """`devise embed` on Ray with output to pipes: our lines only, no colour codes."""
    import numpy as np
    import pandas as pd
    import torch
    from conftest import write_vec
    from PIL import Image

    from devise.model import DeviseHead, HeadSpec, save_model
    from devise.vectors import load_vectors

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DEVISE_HOME"] = str(tmp_path / "home")
    os.environ["DEVISE_HOME"], old = env["DEVISE_HOME"], os.environ.get("DEVISE_HOME")
    try:
        vec = tmp_path / "tiny.vec"
        write_vec(vec, ["cat", "dog", "car", "ship"], dim=8, seed=1)
        wv = load_vectors(vec)
    finally:
        os.environ.pop("DEVISE_HOME") if old is None else os.environ.update(DEVISE_HOME=old)
    rng = np.random.default_rng(0)
    rows = []
    for name in ("cat", "dog"):
        for i in range(4):
            path = tmp_path / "images" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
            rows.append({"path": str(path), "label": name, "class_name": name, "split": "test"})
    pd.DataFrame(rows).to_parquet(tmp_path / "catalog.parquet")
    torch.manual_seed(0)
    spec = HeadSpec(
        in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec),
        vectors_id=wv.vectors_id, class_names=["cat", "dog"],
    )  # fmt: skip
    model = save_model(tmp_path / "model", DeviseHead(spec).eval())
    cmd = [
        sys.executable, "-m", "devise", "embed", "--model", str(model), "--catalog",
        str(tmp_path / "catalog.parquet"), "--out", str(tmp_path / "emb"), "--batch-size", "4",
        "--num-workers", "1", "--cpus-per-worker", "0.5", "--decode-cpus", "0.5",
        "--address", "local",
    ]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280, check=False
    )
    both = out.stdout + out.stderr
    assert out.returncode == 0, both
    assert "Committed " in out.stdout and "8 images embedded" in out.stdout
    assert "\x1b[" not in both
    assert not [line for line in both.splitlines() if " INFO " in line or "\tINFO " in line]
    assert "Warning" not in both and "Total Progress" not in both, both


@pytest.mark.parametrize(
    ("level", "shown"),
    [(-1, set()), (0, {"stage"}), (1, {"stage", "ray-info", "deprecated"})],
)
def test_verbosity_decides_whose_lines_are_shown(level, shown):
    code = (
        "import logging, warnings; from devise import console; "
        f"console.configure({level}); "
        "logging.getLogger('devise.embed').info('stage'); "
        "logging.getLogger('ray.data').info('ray-info'); "
        "warnings.warn('deprecated', DeprecationWarning, stacklevel=1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    words = {"stage", "ray-info", "deprecated"}
    assert {w for w in words if w in out.stderr} == shown
