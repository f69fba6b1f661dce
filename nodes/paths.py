"""Paths from a workflow are untrusted: resolve them inside an allowed root or refuse."""
from __future__ import annotations

import os
from pathlib import Path


class UnsafePathError(ValueError):
    pass


def resolve_inside(root: str | os.PathLike, relative: str, what: str) -> Path:
    """`root / relative`, fully resolved (symlinks too), refused unless it stays inside `root`.

    `what` names the input for the error message (e.g. "filename_prefix")."""
    if relative is None or str(relative).strip() == "":
        raise UnsafePathError(f"{what} is empty")
    text = str(relative).replace("\\", "/")
    if os.path.isabs(text) or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(f"{what} '{relative}' is an absolute path; give a path relative to {root}")
    if ".." in Path(text).parts:
        raise UnsafePathError(f"{what} '{relative}' contains '..'; give a path inside {root}")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what} '{relative}' leads outside {root} (through a symbolic link); "
                              "choose a location inside it")
    return target
