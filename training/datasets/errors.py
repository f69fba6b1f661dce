"""How the dataset engine reports problems.

Two channels, used the same way everywhere:
- `DatasetError` (a ValueError) for problems the user must fix before training can mean anything
  (missing or empty folder, no usable file, ambiguous files, a symlink leaving the folder, a caption
  that is not UTF-8, a clip length the model family cannot take).
- `DatasetWarning` for problems that only lose one file (corrupt image, unreadable video, clip too short,
  caption without an image). Each is issued with `warnings.warn` *and* recorded on the result
  (`Dataset.warnings`, plus `Dataset.skipped` for files left out), so a node can show them in the UI
  and a script sees them on stderr.
"""
from __future__ import annotations

import warnings
from pathlib import Path


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the file or folder and what to do."""


class DatasetWarning(UserWarning):
    """A file was left out or looks wrong; training can go on without it."""


class Report:
    """Collects the warnings and skipped files of one scan (the single place both channels meet)."""

    def __init__(self):
        self.warnings: list[str] = []
        self.skipped: list[tuple[Path, str]] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, DatasetWarning, stacklevel=3)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        self.warn(f"skipped {path}: {reason}")
