"""devise: search images by words with a visual-semantic embedding (DeViSE) on Ray."""

__version__ = "0.1.0"
__all__ = ["Index", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import devise` stays light (no pandas, pyarrow, torch or Ray).
    if name == "Index":
        from devise.api import Index

        return Index
    raise AttributeError(f"module 'devise' has no attribute {name!r}")
