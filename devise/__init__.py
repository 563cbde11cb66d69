"""devise: search images by words with a visual-semantic embedding (DeViSE) on Ray."""

__version__ = "0.1.0"
