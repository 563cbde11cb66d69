"""Shared fixtures: tiny generated image trees, seeded vector tables, one local Ray for the session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# `make test-fast` sets this: the tests that start no Ray cluster and no process only.
FAST = os.environ.get("DEVISE_TEST_FAST") == "1"


def pytest_collection_modifyitems(config, items):
    """Every test on the session's Ray is marked `ray`, so `-m "not ray"` leaves them out."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


_GUARD = {"on": False}


def _refuse_processes() -> None:
    """Under `make test-fast`, a test (or its fixture) that starts a process (a subprocess, a
    worker pool, a local Ray, a browser) is skipped at that moment, saying so: `make test` runs
    it. Nothing needs a list of such tests, and a new one cannot make the fast run slow. A
    library probing for a shared object (ctypes.util.find_library runs ldconfig) is let be."""
    import ctypes.util
    import multiprocessing.process
    import subprocess

    def guarded(original, what):
        def call(*args, **kwargs):
            if _GUARD["on"]:
                pytest.skip(f"starts a process ({what}); `make test` runs it")
            return original(*args, **kwargs)

        return call

    def unguarded(original):
        def call(*args, **kwargs):
            on, _GUARD["on"] = _GUARD["on"], False
            try:
                return original(*args, **kwargs)
            finally:
                _GUARD["on"] = on

        return call

    subprocess.Popen._execute_child = guarded(subprocess.Popen._execute_child, "a subprocess")
    start = multiprocessing.process.BaseProcess.start
    multiprocessing.process.BaseProcess.start = guarded(start, "a worker process")
    os.fork = guarded(os.fork, "a fork")
    ctypes.util.find_library = unguarded(ctypes.util.find_library)


if FAST:
    _refuse_processes()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(item):
        _GUARD["on"] = True
        try:
            return (yield)
        finally:
            _GUARD["on"] = False

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item):
        _GUARD["on"] = True
        try:
            return (yield)
        finally:
            _GUARD["on"] = False


# Class names chosen so the generated vector table below gives each a distinct vector.
TINY_CLASSES = ["cat", "dog", "car", "ship", "ankle boot"]


def make_image(path: Path, seed: int, size: int = 24, mode: str = "RGB") -> Path:
    """A small random-colour image whose mean colour depends on the seed (learnable classes)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    arr = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_class_tree(root: Path, per_class: int = 6) -> Path:
    """ROOT/<class>/img_i.png for TINY_CLASSES; each class a distinct colour (learnable)."""
    for c, name in enumerate(TINY_CLASSES):
        rng = np.random.default_rng(100 + c)
        base = rng.integers(0, 255, size=3)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 15, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            p = root / name / f"img_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """ROOT/<class>/img_i.png: 5 classes x 6 images; each class a distinct colour."""
    return write_class_tree(tmp_path / "images")


def write_vec(path: Path, words: list[str], dim: int = 8, seed: int = 0, header: bool = True):
    """A seeded fastText-style .vec table; returns the matrix written."""
    rng = np.random.default_rng(seed)
    mat = rng.normal(size=(len(words), dim)).astype(np.float32)
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write(f"{len(words)} {dim}\n")
        f.writelines(
            w + " " + " ".join(f"{x:.6f}" for x in row) + "\n" for w, row in zip(words, mat)
        )
    return mat


@pytest.fixture
def vec_file(tmp_path: Path) -> Path:
    """A small .vec with the tiny classes' words plus a few unseen-class words."""
    words = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]
    path = tmp_path / "tiny.vec"
    write_vec(path, words, dim=8, seed=1)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
    yield ray
    ray.shutdown()
