"""Captions that come from the graph (any captioning node), caption edits, and writing captions back
as sidecar files.

Graph captions replace an item's raw caption, exactly where a sidecar .txt would have put it, so the
trigger word, `[trigger]` substitution, dropout and tag shuffling (CaptionConfig) apply to them the same
way at encode time. Edits (prefix, suffix, find-and-replace) apply to every raw caption, graph or file.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError
from .scan import Dataset


@dataclass(frozen=True)
class CaptionEdits:
    prefix: str = ""
    suffix: str = ""
    find: str = ""
    replace: str = ""

    def apply(self, caption: str | None) -> str | None:
        if caption is None and not (self.prefix or self.suffix):
            return None  # still "no caption": the trigger word alone
        text = caption or ""
        if self.find:
            text = text.replace(self.find, self.replace)
        return _join(_join(self.prefix, text), self.suffix)


def _join(a: str, b: str) -> str:
    a, b = a.strip(), b.strip()
    if not a or not b:
        return a or b
    return f"{a}, {b}" if not a.endswith(",") else f"{a} {b}"


def item_names(dataset: Dataset) -> list[str]:
    """One name per item in dataset order (clips of one video share its file name), relative to the
    dataset folder with forward slashes: what a caption mapping matches against."""
    return [item.path.relative_to(dataset.root).as_posix() for item in dataset.items]


def with_raw_captions(dataset: Dataset, captions: list[str | None]) -> Dataset:
    if len(captions) != len(dataset.items):
        raise DatasetError(f"got {len(captions)} captions for {len(dataset.items)} dataset items; wire one caption "
                           "per item, in the order Dojo Dataset Images lists them")
    items = [dataclasses.replace(item, caption_raw=c) for item, c in zip(dataset.items, captions)]
    return dataclasses.replace(dataset, items=items)


def captions_by_order(dataset: Dataset, captions: list[str]) -> Dataset:
    """Caption i belongs to item i."""
    return with_raw_captions(dataset, [c.strip() for c in captions])


def parse_caption_mapping(text: str) -> dict[str, str]:
    """`file name: caption` per line (a name may include its subfolder)."""
    mapping = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(":")
        if not sep or not name.strip():
            raise DatasetError(f"caption mapping line {number} is not 'file name: caption': {line[:60]!r}")
        mapping[name.strip()] = caption.strip()
    return mapping


def captions_by_name(dataset: Dataset, mapping: dict[str, str]) -> Dataset:
    """Items whose file name (or folder/name) is in `mapping` take that caption; the rest keep theirs."""
    names = item_names(dataset)
    known = set(names) | {Path(n).name for n in names}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise DatasetError(f"the caption mapping names {len(unknown)} files that are not in the dataset "
                           f"(e.g. {unknown[:3]}); dataset files are like {names[:3]}")
    captions = []
    for item, name in zip(dataset.items, names):
        caption = mapping.get(name, mapping.get(Path(name).name, item.caption_raw))
        captions.append(caption)
    return with_raw_captions(dataset, captions)


def edit_captions(dataset: Dataset, edits: CaptionEdits) -> Dataset:
    return with_raw_captions(dataset, [edits.apply(item.caption_raw) for item in dataset.items])


@dataclass
class WriteReport:
    folder: Path
    written: list[Path]
    kept: list[Path]          # existing sidecars left alone (overwrite off)
    copied: bool
    backups: list[Path] = field(default_factory=list)   # old captions kept before overwrite (name.txt.bak)


def write_captions(dataset: Dataset, overwrite: bool, copy_to: Path | None = None) -> WriteReport:
    """Write each item's raw caption (after graph captions and edits; the trigger word is applied again
    when the folder is loaded) as `<stem>.txt` next to its file, or into `copy_to`, a new folder that
    receives a copy of the dataset's files. Existing caption files are kept unless `overwrite`."""
    target_root = copy_to or dataset.root
    if copy_to is not None:
        if copy_to.exists():
            raise FileExistsError(f"{copy_to} already exists; captions are never written over another copy")
        copy_to.mkdir(parents=True)
    written, kept, backups, done = [], [], [], set()
    for item in dataset.items:
        relative = item.path.relative_to(dataset.root)
        if relative in done or item.caption_raw is None:
            continue
        done.add(relative)
        media = target_root / relative
        if copy_to is not None:
            media.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item.path, media)
        sidecar = media.with_suffix(".txt")
        if sidecar.exists() and not overwrite:
            kept.append(sidecar)
            continue
        if sidecar.exists():
            backups.append(keep_backup(sidecar))
        tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp.write_text(item.caption_raw + "\n", encoding="utf-8")
        tmp.replace(sidecar)  # atomic; replaces only when overwrite is on (the old text is in the backup)
        written.append(sidecar)
    return WriteReport(target_root, written, kept, copy_to is not None, backups)


def keep_backup(path: Path) -> Path:
    """Keep `path`'s current content as `name.txt.bak` (or `name.txt.00001.bak`, counting up: an existing
    backup is never replaced) before it is overwritten; returns the backup's path."""
    candidates = [path.with_name(path.name + ".bak")] + [path.with_name(f"{path.name}.{n:05d}.bak") for n in range(1, 100000)]
    for backup in candidates:
        try:
            os.link(path, backup)  # atomic and never over an existing name; the replace then swaps only path
            return backup
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: copy, still never over an existing backup
            if os.path.lexists(backup):
                continue
            with open(path, "rb") as src, open(backup, "xb") as dst:
                shutil.copyfileobj(src, dst)
            return backup
    raise FileExistsError(f"{path} has too many backups; remove some of its .bak files")
