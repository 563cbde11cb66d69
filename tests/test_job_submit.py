"""`ray job submit` of a real job against a real local Ray head, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ray_head import job_env, local_head

from devise.model import DeviseHead, HeadSpec, save_model
from devise.vectors import load_vectors

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _wait_for(address: str, job_id: str, timeout: float = 400) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if status != JobStatus.SUCCEEDED:
                print(client.get_job_logs(job_id)[-4000:])
            return str(status.value)
        time.sleep(2)
    raise TimeoutError(f"job {job_id} did not finish: {client.get_job_logs(job_id)[-4000:]}")


@pytest.mark.timeout(600)
def test_ray_job_submit_embeds_to_parquet_and_search_answers(image_tree, vec_file, tmp_path):
    vectors = load_vectors(vec_file, cache_dir=tmp_path / "vc")
    spec = HeadSpec(
        in_dim=64, out_dim=vectors.dim, kind="linear", backbone="tiny", image_size=32,
        vectors=str(vec_file), vectors_id=vectors.vectors_id,
        class_keys=["cat", "dog"], class_names=["cat", "dog"],
    )  # fmt: skip
    model = save_model(tmp_path / "model", DeviseHead(spec).eval())
    out = tmp_path / "embeddings"
    with local_head(num_cpus=2) as address:
        submit = subprocess.run(
            [
                RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                "--no-wait", "--",
                "python", "jobs/embed.py", "--model", str(model), "--images", str(image_tree),
                "--out", str(out), "--num-workers", "1", "--cpus-per-worker", "0.5",
                "--decode-cpus", "0.5", "--batch-size", "8",
            ],
            env=job_env(), capture_output=True, text=True, timeout=180, cwd=ROOT, check=False,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr[-3000:]
        job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
        assert _wait_for(address, job_id) == "SUCCEEDED"

    # The committed version is complete: every image, unit-norm embeddings, model metadata.
    from devise.search import EmbeddingIndex

    index = EmbeddingIndex.open(out)
    assert len(index.paths) == 30
    assert set(map(str, index.paths)) == {str(p.resolve()) for p in image_tree.rglob("*.png")}
    assert np.allclose(np.linalg.norm(index.matrix, axis=1), 1.0, atol=1e-4)

    # `devise search` answers from what the job wrote.
    result = subprocess.run(
        [sys.executable, "-m", "devise", "search", "cat", "--embeddings", str(out), "-k", "3",
         "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(Path(h["path"]).exists() for h in hits)
