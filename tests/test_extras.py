"""Optional extras: the core imports and runs without them; a missing one is a one-line pip hint."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from devise import cli
from devise.errors import DeviseError
from devise.extras import EXTRAS, MissingExtraError, install_line, require


def test_require_returns_the_module_when_installed() -> None:
    import json

    assert require("json", "index") is json


def test_a_missing_extra_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import now fails as if not installed
    with pytest.raises(MissingExtraError) as err:
        require("faiss", "index", feature="devise index")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("devise index needs 'faiss'")
    assert msg.endswith("pip install 'devise[index]'")
    assert isinstance(err.value, ImportError)
    assert isinstance(err.value, DeviseError)


def test_an_unknown_extra_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("json", "gpu")


def test_every_extra_exists_in_pyproject() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(EXTRAS) <= set(pyproject["project"]["optional-dependencies"])
    assert install_line("serve") == "pip install 'devise[serve]'"


def test_cli_prints_a_missing_extra_as_one_line(monkeypatch, capsys) -> None:
    def needs_faiss(args):
        require("faiss", "index", feature="devise index")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda *a, **k: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.add_parser("needs-faiss").set_defaults(func=needs_faiss)
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert cli.main(["needs-faiss"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "devise needs-faiss: error: devise index needs 'faiss', which is not installed: "
        "run pip install 'devise[index]'"
    )


# Modules that only the extras bring (serve, index, dev); the core must not import them.
EXTRA_ONLY = ["faiss", "fastapi", "uvicorn", "multipart", "ray.serve", "playwright", "duckdb",
              "skimage", "pytest", "scipy", "yaml"]  # fmt: skip


def test_core_imports_and_help_work_without_the_extras() -> None:
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        blocked = {EXTRA_ONLY!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in blocked):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        import devise
        from devise import cli
        for m in pkgutil.iter_modules(devise.__path__):
            if m.name != "__main__":
                importlib.import_module("devise." + m.name)
        cli.build_parser().format_help()
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
