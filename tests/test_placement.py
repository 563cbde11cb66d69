"""Where a job's work lands on a cluster, without starting one: the placement strategy flag,
the worker nodes in metrics.jsonl, the index build's one line when its tasks are lost, and
the shared-storage check on a one-node Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from devise import config, runs
from devise import training as T
from devise.commands import train as train_cmd
from devise.commands.train import add_train_args


def _parse(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_train_args(p)
    return p.parse_args(["--catalog", "c.parquet", "--out", "run", *extra])


def test_placement_strategy_flag_reaches_the_config_and_not_the_run_key(capsys) -> None:
    assert (
        train_cmd.config_from_args(_parse()).placement_strategy == "PACK"
    )  # Ray Train's own default
    spread = train_cmd.config_from_args(_parse("--placement-strategy", "spread"))
    assert spread.placement_strategy == "SPREAD"
    # Where the workers run does not change what the run computes: a rerun resumes.
    assert spread.run_key() == train_cmd.config_from_args(_parse()).run_key()
    with pytest.raises(SystemExit) as info:
        _parse("--placement-strategy", "scatter")
    assert info.value.code == 2 and "invalid choice: 'SCATTER'" in capsys.readouterr().err


def test_an_unknown_placement_strategy_is_one_sentence(tmp_path: Path) -> None:
    cfg = config.TrainConfig(catalog=str(tmp_path / "c"), out=str(tmp_path), placement_strategy="X")
    with pytest.raises(runs.TrainError) as info:
        T._validate(cfg)
    assert str(info.value) == (
        "Unknown placement strategy 'X'; choose one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."
    )


def test_metrics_list_every_ranks_node_in_rank_order(tmp_path: Path) -> None:
    w = runs.MetricsWriter(str(tmp_path / "metrics.jsonl"))
    w.after_report(None, [{"epoch": 1, "x": 1.0, "node": "a"}, {"epoch": 1, "node": "b"}], None)
    w.after_report(None, [{"epoch": 2, "x": 2.0}], None)  # --local: no Ray node
    rows = runs.read_metrics(tmp_path)
    assert rows[0]["worker_nodes"] == ["a", "b"] and "node" not in rows[0]
    assert "worker_nodes" not in rows[1]


def test_index_tasks_lost_past_their_retries_are_one_line(ray_session, monkeypatch) -> None:
    """A Ray task that dies with its worker (as with its node) and has no retries left: the
    build stops with one IndexBuildError line saying nothing was committed."""
    import os

    from devise.ann import IndexTasksLostError, shards

    monkeypatch.setattr(shards, "TASK_RETRIES", 0)
    runner = shards._Runner(local=False, cpus_per_task=0.25, what="v00001-m1")
    with pytest.raises(IndexTasksLostError) as info:
        runner.map(os._exit, [(1,)], {})
    line = str(info.value)
    assert "\n" not in line and line.startswith("Building the index of v00001-m1 lost its Ray")
    assert line.endswith("nothing was committed and its search is as before: rerun `devise index`.")
    assert runner.map(abs, [(-2,), (3,)], {}) == [2, 3]
    assert len(runner.nodes) == 1  # the one node of this Ray


def test_a_one_node_ray_needs_no_shared_storage(ray_session, tmp_path: Path) -> None:
    from devise.runtime import unseen_on_nodes

    assert unseen_on_nodes(tmp_path / "ckpt") == []
    assert not (tmp_path / "ckpt").exists()  # no other node to ask: nothing written
