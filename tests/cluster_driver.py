"""A job driver for the cluster tests, run as its own process against a test cluster, with
hooks that hold it at a known point so a test can lose a node (or the driver) there.

    python tests/cluster_driver.py embed CONFIG_JSON HOOK_DIR [PAUSE_AFTER_CHUNK PAUSE_S [BATCH_S]]
    python tests/cluster_driver.py index HOOK_DIR TASK_RETRIES SHARD_PAUSE_S -- INDEX ARGS...

embed: devise.embed.embed(EmbedConfig.from_dict(CONFIG_JSON)); every staged chunk appends
{"index", "rows", "time"} to HOOK_DIR/chunks.jsonl, and after chunk PAUSE_AFTER_CHUNK the
driver sleeps PAUSE_S (Ray Data keeps working meanwhile); with BATCH_S, the model actors wait
for each other on two nodes and then take BATCH_S a batch (see _slow_actor); the result is
HOOK_DIR/result.json (not stdout, where Ray forwards the cluster's log lines, which may come last). index: `devise index INDEX ARGS` whose shard tasks each write
HOOK_DIR/shard-<node>-<pid> when they start, then sleep SHARD_PAUSE_S; shards.TASK_RETRIES is set
to TASK_RETRIES.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT_FILE = "result.json"


def _slow_actor(hook_dir: str, batch_s: float):
    """ModelActor that notes its node (HOOK_DIR/actor-<node>-<pid>), holds its first batch
    until actors run on two nodes (3 minutes at most), then takes batch_s a batch: the work is
    still spread over both nodes when a test kills one."""
    import os

    from devise import pipeline

    class SlowModelActor(pipeline.ModelActor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            (Path(hook_dir) / f"actor-{self.node}-{os.getpid()}").write_text(str(time.time()))

        def __call__(self, batch):
            deadline = time.time() + 180
            while len(_actor_nodes(hook_dir)) < 2 and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(batch_s)
            return super().__call__(batch)

    return SlowModelActor


def _actor_nodes(hook_dir: str) -> set[str]:
    return {p.name.split("-")[1] for p in Path(hook_dir).glob("actor-*")}


def run_embed(
    config_json: str, hook_dir: str, pause_after: int = -1, pause_s: float = 0, batch_s: float = 0
) -> int:
    from devise import pipeline
    from devise.config import EmbedConfig
    from devise.embed import embed
    from devise.runtime import init_ray

    if batch_s:
        pipeline.ModelActor = _slow_actor(hook_dir, batch_s)
    config = EmbedConfig.from_dict(json.loads(config_json))
    init_ray(config.address)
    log = Path(hook_dir) / "chunks.jsonl"

    def on_part(info) -> None:
        with open(log, "a") as f:
            f.write(json.dumps({"index": info.index, "rows": info.rows, "time": time.time()}))
            f.write("\n")
        if info.index == pause_after:
            time.sleep(pause_s)

    result = embed(config, on_part=on_part)
    (Path(hook_dir) / RESULT_FILE).write_text(json.dumps(asdict(result), default=str))
    return 0


def _slow(hook_dir: str, pause_s: float):
    """build_shard, after noting where it runs (a file in hook_dir) and a pause."""

    def shard(*args, **kwargs):
        import os

        import ray

        from devise.ann import shards

        node = ray.get_runtime_context().get_node_id()
        (Path(hook_dir) / f"shard-{node}-{os.getpid()}").write_text(str(time.time()))
        time.sleep(pause_s)
        return shards.build_shard(*args, **kwargs)  # in the task's process: the real one

    return shard


def run_index(hook_dir: str, retries: str, pause_s: str, argv: list[str]) -> int:
    import ray.cloudpickle

    from devise import cli
    from devise.ann import build, shards

    # The tasks run this module's function: ship it by value (workers cannot import tests/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shards.TASK_RETRIES = int(retries)
    build.build_shard = _slow(hook_dir, float(pause_s))
    return cli.main(["index", *argv])


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "embed":
        extra = [int(rest[2]), *map(float, rest[3:5])] if len(rest) > 2 else []
        sys.exit(run_embed(rest[0], rest[1], *extra))
    cut = rest.index("--")
    sys.exit(run_index(*rest[:3], rest[cut + 1 :]))
