"""Paths from a workflow are untrusted: resolve them inside an allowed root or refuse."""
from __future__ import annotations

import os
from pathlib import Path

from ..training.files import MAX_NAME_BYTES


class UnsafePathError(ValueError):
    pass


def check_name_text(text: str, what: str) -> None:
    """Refuse what no file system takes or what would be read as another place: null bytes and names
    too long to carry a counter and a suffix."""
    if "\x00" in text:
        raise UnsafePathError(f"{what} contains a null byte (\\x00), which no file name may hold; retype it")
    for part in text.replace("\\", "/").split("/"):
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise UnsafePathError(f"{what}: the name '{part[:40]}...' is {len(part)} characters long; a file or folder "
                                  f"name may have at most {MAX_NAME_BYTES} bytes here (so that _00001.safetensors fits)")


def resolve_inside(root: str | os.PathLike, relative: str, what: str, allow_root: bool = False) -> Path:
    """`root / relative`, fully resolved (symlinks too), refused unless it stays inside `root`.

    The root itself ('.', './', './.', 'a/..') is refused unless `allow_root`: a name must name something
    inside the folder. `what` names the input for the error message (e.g. "filename_prefix")."""
    if relative is None or str(relative).strip() == "":
        raise UnsafePathError(f"{what} is empty; give a name such as dojo/my_lora")
    text = str(relative).replace("\\", "/")
    check_name_text(text, what)
    if os.path.isabs(text) or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(f"{what} '{relative}' is an absolute path; give a path relative to {root}")
    if ".." in Path(text).parts:
        raise UnsafePathError(f"{what} '{relative}' contains '..'; give a path inside {root}")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target == base and not allow_root:
        raise UnsafePathError(f"{what} '{relative}' names the folder {root} itself, not something inside it; "
                              "give a name, e.g. dojo/my_lora")
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what} '{relative}' leads outside {root} (through a symbolic link); "
                              "choose a location inside it")
    return target
