"""`devise train --local` and `devise evaluate --local`: the same loop and outputs in this process,
without Ray; SIGTERM stops it with a resumable run; its model serves embed and search."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import TINY_CLASSES, write_class_tree, write_vec
from train_child import stop_after_first_epoch

from devise import cli, runs
from devise.catalog import build_catalog, write_catalog
from devise.model import load_model

REPO = Path(__file__).resolve().parents[1]

# A child that runs `devise ARGV...` and says at exit whether anything imported Ray.
CHILD = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('ray imported:', 'ray' in sys.modules, flush=True))\n"
    "from devise.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """5 colour classes x 6 images, 'ship' held out, a seeded .vec and a feature cache shared by
    this module's tests (the backbone runs once)."""
    base = tmp_path_factory.mktemp("local-inputs")
    root = write_class_tree(base / "images")
    catalog = write_catalog(
        build_catalog(root, test_fraction=0.34, holdout=["ship"], seed=0), base / "catalog.parquet"
    )
    words = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]
    write_vec(base / "tiny.vec", words, dim=8, seed=1)
    return {"catalog": catalog, "vectors": base / "tiny.vec", "cache": base / "features"}


def _argv(inputs: dict, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--catalog", str(inputs["catalog"]), "--out", str(out),
        "--vectors", str(inputs["vectors"]), "--backbone", "tiny", "--image-size", "32",
        "--batch-size", "8", "--lr", "0.01", "--feature-cache", str(inputs["cache"]), "--local",
        *extra,
    ]  # fmt: skip


def test_local_train_stops_on_sigterm_without_ray_and_a_rerun_resumes(
    inputs: dict, tmp_path: Path, capsys
) -> None:
    """A `devise train --local` child never imports Ray; SIGTERM after epoch 1's checkpoint ends
    it with exit 143 and one line, leaving no temp folders; the same command then continues at
    epoch 2 (epoch 1 is not trained again) and commits the model, metrics and loss plot."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", CHILD, *_argv(inputs, out, "--epochs", "3")]
    proc, stdout, stderr = stop_after_first_epoch(cmd, out, wait_s=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "ray imported: False" in stdout, stdout[-2000:]
    assert "in this process (no Ray)" in stdout
    assert stderr.strip().splitlines()[-1] == (
        "devise train: error: Stopped by SIGTERM after epoch 1; rerun the same command to "
        "resume from the latest checkpoint."
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (out / "model").exists()
    assert [p.name for p in out.rglob(".*")] == []  # no half-written checkpoint or model
    first = runs.read_metrics(out)

    assert cli.main(_argv(inputs, out, "--epochs", "3")) == 0
    assert "Resuming from the checkpoint of epoch 1." in capsys.readouterr().out
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["start_epoch"] for m in metrics] == [1, 2, 2]  # resumed, not restarted
    assert metrics[0] == first[0]
    assert all(m["world_size"] == 1 and m["test_count"] > 0 for m in metrics)
    cfg = json.loads((out / "config.json").read_text())
    ckpts = sorted(p.name for p in (out / "checkpoints" / cfg["run_name"]).glob("epoch_*"))
    assert ckpts == ["epoch_0002", "epoch_0003"]  # --keep-checkpoints 2, as Ray Train keeps
    assert metrics[-1]["checkpoint"].endswith("epoch_0003")
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_model(out / "model").spec.class_keys == cfg["classes"]["keys"]

    # A finished run returns at once: nothing is trained again.
    assert cli.main(_argv(inputs, out, "--epochs", "3")) == 0
    assert runs.read_metrics(out) == metrics


def test_local_model_serves_embed_search_and_evaluate(inputs: dict, tmp_path: Path, capsys) -> None:
    """The model of a --local run embeds (embed --local), answers word queries through Index in
    its own text space, and `devise evaluate --local` writes its report."""
    from devise.api import Index

    out = tmp_path / "run"
    assert cli.main(_argv(inputs, out, "--epochs", "40")) == 0
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == list(range(1, 41))
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # it learns
    spec = load_model(out / "model").spec
    assert spec.backbone == "tiny" and spec.image_size == 32 and spec.kind == "linear"
    assert spec.vectors == str(inputs["vectors"]) and spec.vectors_id
    assert sorted(spec.class_keys) == sorted(set(TINY_CLASSES) - {"ship"})
    # --class-text auto chose among a word table's wordings on pseudo-unseen classes; the tiny
    # backbone has no ImageNet classifier, so there is no ConSE branch to blend.
    chosen = json.loads((out / "config.json").read_text())["class_text"]
    assert spec.class_text == chosen["wording"] in ("name", "names")
    assert spec.conse_classes == 0 and chosen["conse_weight"] == 0.0

    emb = tmp_path / "emb"
    embed = ["embed", "--model", str(out / "model"), "--catalog", str(inputs["catalog"])]
    assert cli.main([*embed, "--out", str(emb), "--local", "--batch-size", "8"]) == 0
    index = Index.open(emb)
    assert len(index) == 30
    hits = index.search("dog", k=6)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5, 6]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert sum(h["label"] == "dog" for h in hits) >= 4  # colour classes: the head separates them

    report = tmp_path / "report"
    capsys.readouterr()
    rc = cli.main(
        ["evaluate", "--model", str(out / "model"), "--catalog", str(inputs["catalog"]),
         "--out", str(report), "--feature-cache", str(tmp_path / "eval-features"), "--local"]
    )  # fmt: skip
    assert rc == 0
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["unseen_classes"] == ["ship"]
    assert saved["methods"]["DeViSE"]["flat"]["hit@1"] >= 50
    assert "| DeViSE |" in (report / "report.md").read_text()
    assert (report / "confusion.png").stat().st_size > 1000
    assert any((tmp_path / "eval-features").glob("tiny-32px-*"))  # computed here, by --local


def test_local_online_mode_tunes_the_last_block(inputs: dict, tmp_path: Path) -> None:
    """The notebook's way runs in this process too: images through the backbone every epoch,
    the last block trained and saved with the model."""
    out = tmp_path / "run"
    argv = _argv(inputs, out, "--mode", "online", "--unfreeze-last", "--epochs", "2")
    assert cli.main([*argv, "--backbone-lr", "0.05"]) == 0
    metrics = runs.read_metrics(out)
    assert [(m["epoch"], m["world_size"], m["decode_errors"]) for m in metrics] == [
        (1, 1, 0),
        (2, 1, 0),
    ]
    spec = load_model(out / "model").spec
    assert spec.backbone_weights == str(out / "model" / "backbone.pt")
    assert Path(spec.backbone_weights).stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--address", "127.0.0.1:1"],
            (
                "--local runs in this process without Ray, so --address 127.0.0.1:1 has nothing to "
                "join; drop one of them."
            ),
        ),
        (
            ["--num-workers", "2"],
            (
                "--local runs one worker in this process, so --num-workers 2 cannot apply; drop one "
                "of them."
            ),
        ),
        (
            ["--storage", "s3://bucket/ckpt"],
            (
                "--local writes checkpoints to a folder on this machine, not s3://bucket/ckpt; pass a "
                "local --storage or drop --local."
            ),
        ),
    ],
)
def test_local_refuses_flags_that_need_ray_in_one_sentence(
    inputs: dict, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    assert cli.main(_argv(inputs, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"devise train: error: {message}"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_local_flag_is_defined_once_with_when_to_use_it(capsys) -> None:
    """train and evaluate take --local from add_ray_args, whose help says when to use it; an
    explicit --num-workers 1 is no conflict, and the default one is none either."""
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = re.sub(r"\s+", " ", capsys.readouterr().out)
        assert "--local run in this process without Ray, for small jobs on one machine" in text
    from devise.commands.common import given_workers

    p = cli.build_parser(command="train")
    base = ["--catalog", "c", "--out", "o", "--local"]
    assert given_workers(p.parse_args(base)) is None
    assert given_workers(p.parse_args([*base, "--num-workers", "1"])) == 1
