"""Bad input never stops an embedding run and never drops a row: each broken kind lands in
errors.parquet with its reason; odd but valid modes (CMYK, L, P, RGBA, 16-bit) are embedded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from devise import cli
from devise.model import DeviseHead, HeadSpec, save_model
from devise.store import embedding_matrix, read_manifest, read_version


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header claiming side x side pixels (10^10) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b""))
    return path


def _pixels(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def make_inputs(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(good files by kind, bad files by kind): every kind the job must handle."""
    root.mkdir(parents=True, exist_ok=True)
    good = {}
    rgb = Image.fromarray(_pixels(0))
    good["rgb"] = root / "rgb.png"
    rgb.save(good["rgb"])
    good["cmyk"] = root / "cmyk.jpg"
    rgb.convert("CMYK").save(good["cmyk"])
    good["gray"] = root / "gray.png"
    rgb.convert("L").save(good["gray"])
    good["palette"] = root / "palette.png"
    rgb.convert("P").save(good["palette"])
    good["rgba"] = root / "rgba.png"
    rgba = np.dstack([_pixels(1), np.full((40, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(good["rgba"])
    good["16bit"] = root / "16bit.png"
    Image.fromarray((np.arange(1600, dtype=np.uint16) * 40).reshape(40, 40)).save(good["16bit"])
    assert Image.open(good["16bit"]).mode.startswith("I;16")

    bad = {}
    bad["empty"] = root / "empty.png"
    bad["empty"].write_bytes(b"")
    full_png = (root / "rgb.png").read_bytes()
    bad["truncated_png"] = root / "truncated.png"
    bad["truncated_png"].write_bytes(full_png[: len(full_png) // 2])
    jpg = root / "_whole.jpg"
    Image.fromarray(_pixels(2, 64)).save(jpg, quality=95)
    bad["truncated_jpeg"] = root / "truncated.jpg"
    bad["truncated_jpeg"].write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    jpg.unlink()
    bad["not_image"] = root / "notes.jpg"
    bad["not_image"].write_text("this is a text file, not a JPEG\n")
    bad["bomb"] = bomb_png(root / "bomb.png")
    bad["missing"] = root / "missing.png"  # listed in the catalog, never written
    return good, bad


REASONS = {
    "empty": "empty file",
    "truncated_png": "truncated",
    "truncated_jpeg": "truncated",
    "not_image": "not an image",
    "bomb": "too large",
    "missing": "does not exist",
}


@pytest.mark.timeout(240)
def test_each_bad_kind_is_an_error_row_and_odd_modes_are_embedded(ray_session, tmp_path, capsys):
    good, bad = make_inputs(tmp_path / "images")
    rows = [
        {"path": str(p), "label": kind, "class_name": kind, "split": "test"}
        for kind, p in {**good, **bad}.items()
    ]
    catalog = tmp_path / "catalog.parquet"
    pd.DataFrame(rows).to_parquet(catalog)
    torch.manual_seed(0)
    spec = HeadSpec(in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors="none")
    save_model(tmp_path / "model", DeviseHead(spec).eval())
    out = tmp_path / "emb"
    rc = cli.main(
        ["embed", "--model", str(tmp_path / "model"), "--catalog", str(catalog), "--out",
         str(out), "--batch-size", "4", "--num-workers", "2", "--cpus-per-worker", "0.5",
         "--decode-cpus", "0.5"]
    )  # fmt: skip
    assert rc == 0
    assert f"{len(good)} images embedded, {len(bad)} errors" in capsys.readouterr().out

    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert sorted(errors["path"]) == sorted(str(p) for p in bad.values())
    reason = dict(zip(errors["label"], errors["reason"]))
    for kind, expected in REASONS.items():
        assert expected in reason[kind], (kind, reason[kind])
    assert pd.isna(errors.set_index("label").loc["missing", "size_bytes"])
    manifest, table = read_version(out)
    assert manifest.rows == len(good) and manifest.errors == len(bad)
    assert sorted(table.column("path").to_pylist()) == sorted(str(p) for p in good.values())
    m = embedding_matrix(table)
    assert np.isfinite(m).all() and np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    assert read_manifest(out).errors == len(bad)
