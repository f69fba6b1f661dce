"""Scan a folder into a `Dataset`: which files, which captions, which bucket, which frames.

Layout (kohya style): media files directly in the folder train once per epoch; a subfolder named
`N_name` (e.g. `10_cat`) repeats its files N times; any other subfolder counts once. Deeper folders
and hidden entries are ignored. `<stem>.txt` next to a file is its caption.

Scanning reads headers (image sizes, video packet timestamps) and, with `verify`, decodes each image
and each video's first frame once to find corrupt files early; pixels are decoded again on demand by
`DatasetItem.load()`, so a scan holds no pixel data.
"""
from __future__ import annotations

import random
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .buckets import BucketConfig, bucket_for, fit, make_batches, make_buckets
from .captions import CaptionConfig, caption_with, read_caption_file
from .errors import DatasetError, Report
from .images import IMAGE_SUFFIXES, image_size, load_rgb, pil_to_tensor, resize_and_crop
from .video import VIDEO_SUFFIXES, ClipConfig, clip_frame_indices, decode_frames, probe_video

CAPTION_SUFFIX = ".txt"
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetConfig:
    """Everything that decides what a scan produces. `seed` drives random crops here and, mixed with
    the epoch, batch order and caption randomness later; nothing uses the global RNG."""
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    seed: int = 0
    verify: bool = True


@dataclass(frozen=True)
class DatasetItem:
    """One training sample: a still (t = 1) or one clip of a video, with how to bring it to its bucket.

    bucket: (h, w, t) it trains at; source_size: (h, w) of the file after EXIF orientation;
    resize_to / crop: resize to (h, w), then cut (top, left, h, w); frame_indices: source frames of a
    clip (None for a still)."""
    path: Path
    caption_raw: str | None
    repeats: int
    bucket: tuple[int, int, int]
    source_size: tuple[int, int]
    resize_to: tuple[int, int]
    crop: tuple[int, int, int, int]
    frame_indices: tuple[int, ...] | None = None

    @property
    def is_clip(self) -> bool:
        return self.frame_indices is not None

    def load(self) -> torch.Tensor:
        """Pixels as float32 [T, C, H, W] in [-1, 1], T/H/W = the bucket's t/h/w."""
        try:
            frames = decode_frames(self.path, self.frame_indices) if self.is_clip else [load_rgb(self.path)]
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"cannot decode {self.path} ({exc}); fix or remove the file and scan again") from exc
        if (frames[0].height, frames[0].width) != self.source_size:
            raise DatasetError(f"{self.path} is {frames[0].height}x{frames[0].width} now but was "
                               f"{self.source_size[0]}x{self.source_size[1]} when scanned; scan the folder again")
        return torch.stack([pil_to_tensor(resize_and_crop(f, self.resize_to, self.crop)) for f in frames])

    def caption(self, config: CaptionConfig, rng: random.Random) -> str:
        return caption_with(config, self.caption_raw, rng)


@dataclass
class Dataset:
    root: Path
    config: DatasetConfig
    items: list[DatasetItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def bucket_counts(self) -> Counter:
        return Counter(item.bucket for item in self.items)

    def epoch_rng(self, epoch: int) -> random.Random:
        """The generator for one epoch's batch order and captions (seed and epoch, nothing global)."""
        return random.Random(self.config.seed * 1_000_003 + epoch)

    def batches(self, batch_size: int, epoch: int = 0, drop_last: bool = False) -> list[list[DatasetItem]]:
        """One epoch: each item `repeats` times, in batches that never mix buckets or frame counts."""
        return self._batches(batch_size, self.epoch_rng(epoch), drop_last)

    def epoch_plan(self, batch_size: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[tuple[DatasetItem, str]]]:
        """One epoch's batches with each sample's final caption (dropout, shuffle, trigger), all
        drawn from the one per-epoch generator: the same seed and epoch give the same plan."""
        rng = self.epoch_rng(epoch)
        batches = self._batches(batch_size, rng, drop_last)
        return [[(item, item.caption(self.config.captions, rng)) for item in batch] for batch in batches]

    def _batches(self, batch_size: int, rng: random.Random, drop_last: bool) -> list[list[DatasetItem]]:
        expanded = [item for item in self.items for _ in range(item.repeats)]
        return make_batches(expanded, batch_size, key=lambda item: item.bucket, rng=rng, drop_last=drop_last)


def scan_folder(root: Path, config: DatasetConfig | None = None) -> Dataset:
    """Scan `root` (see the module docstring). Raises DatasetError for a missing, empty or unusable
    folder; files that fail alone are skipped with a DatasetWarning and listed in `skipped`."""
    config = config or DatasetConfig()
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file, not a folder; give the folder that holds the images")
    real_root = root.resolve()
    report = Report()
    folders = _folders_with_repeats(root, real_root, report)
    if not any(_visible_entries(folder) for folder, _ in folders):
        raise DatasetError(f"dataset folder {root} is empty; put images or videos (with .txt captions) in it")

    buckets = make_buckets(config.buckets.resolution, config.buckets.step,
                           config.buckets.min_side, config.buckets.max_side)
    crop_rng = random.Random(config.seed)
    items: list[DatasetItem] = []
    media_count = 0
    for folder, repeats in folders:
        media, captions = _media_and_captions(folder, real_root, report)
        media_count += len(media)
        for path in media:
            caption_path = captions.get(path.stem)
            caption = read_caption_file(caption_path) if caption_path else None
            items += _items_for(path, caption, repeats, config, buckets, crop_rng, report)

    if media_count == 0:
        raise DatasetError(f"no supported files in {root}: expected images "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))}) or videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
    if not items:
        reasons = "; ".join(f"{p.name}: {r}" for p, r in report.skipped[:5])
        raise DatasetError(f"every file in {root} failed ({len(report.skipped)} skipped: {reasons}); "
                           "fix the files or the settings")
    uncaptioned = [item for item in items if not (item.caption_raw or "").strip()]
    if uncaptioned and not config.captions.trigger.strip():
        every = "no item has" if len(uncaptioned) == len(items) else f"{len(uncaptioned)} of {len(items)} items have"
        report.warn(f"{every} a caption (.txt) and no trigger word is set: a LoRA trains them on an empty "
                    "caption, so no prompt word calls up what they teach; set trigger_word or add captions "
                    "(textual inversion's object/style templates need neither)")
    return Dataset(root=root, config=config, items=items, skipped=report.skipped, warnings=report.warnings)


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _check_inside(entry: Path, real_root: Path) -> None:
    """Refuse an entry (usually a symlink) whose real location is outside the scanned folder."""
    if not entry.resolve().is_relative_to(real_root):
        raise DatasetError(f"{entry} points outside the dataset folder (to {entry.resolve()}); "
                           "copy the file into the folder instead of linking it")


def _folders_with_repeats(root: Path, real_root: Path, report: Report) -> list[tuple[Path, int]]:
    folders = [(root, 1)]
    for entry in _visible_entries(root):
        if not entry.is_dir():
            continue
        _check_inside(entry, real_root)
        match = _REPEAT_FOLDER.match(entry.name)
        repeats = int(match.group(1)) if match else 1
        if repeats == 0:
            report.warn(f"folder {entry} has 0 repeats and is left out; rename it to N_{match.group(2)} with N >= 1")
            continue
        folders.append((entry, repeats))
        for nested in _visible_entries(entry):
            if nested.is_dir():
                report.warn(f"folder {nested} is ignored: only one level of subfolders is scanned; "
                            "move its files up into an N_name folder")
    return folders


def _media_and_captions(folder: Path, real_root: Path, report: Report) -> tuple[list[Path], dict[str, Path]]:
    """The media files of one folder and its caption files by stem; refuses ambiguous stems."""
    media_by_stem: dict[str, Path] = {}
    captions: dict[str, Path] = {}
    for entry in _visible_entries(folder):
        if entry.is_dir():
            continue
        _check_inside(entry, real_root)
        suffix = entry.suffix.lower()
        kind = _not_regular(entry)
        if kind and (suffix == CAPTION_SUFFIX or suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES):
            # opening a FIFO blocks until a writer appears; devices and sockets are not data either
            report.skip(entry, f"not a regular file ({kind}); only ordinary files are read")
            continue
        if suffix == CAPTION_SUFFIX:
            captions[entry.stem] = entry
        elif suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES:
            if entry.stem in media_by_stem:
                raise DatasetError(f"{media_by_stem[entry.stem]} and {entry} share the name "
                                   f"'{entry.stem}', so '{entry.stem}.txt' would caption both; rename or remove one")
            media_by_stem[entry.stem] = entry
    for stem, caption_path in captions.items():
        if stem not in media_by_stem:
            report.warn(f"caption {caption_path} has no image or video named '{stem}'; "
                        "rename it to match a file or delete it")
    return list(media_by_stem.values()), captions


def _not_regular(entry: Path) -> str | None:
    """What `entry` is when it is not a regular file (through symbolic links), else None."""
    try:
        mode = entry.stat().st_mode
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO / named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _is_clip_source(path: Path, config: DatasetConfig) -> bool:
    """Videos always; GIFs only when clips are wanted and the GIF is animated."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix == ".gif" and config.clips.wants_clips:
        with Image.open(path) as img:
            return getattr(img, "n_frames", 1) > 1
    return False


def _items_for(path: Path, caption: str | None, repeats: int, config: DatasetConfig,
               buckets: list[tuple[int, int]], crop_rng: random.Random, report: Report) -> list[DatasetItem]:
    try:
        clip_source = _is_clip_source(path, config)
    except Exception as exc:
        report.skip(path, f"unreadable image ({exc})")
        return []
    if clip_source:
        return _clip_items(path, caption, repeats, config, buckets, crop_rng, report)
    try:
        size = image_size(path)
    except Image.DecompressionBombError as exc:
        report.skip(path, f"too large to decode safely ({exc}); downscale it first")
        return []
    except Exception as exc:
        report.skip(path, f"corrupt or truncated image ({exc}); re-save or remove it")
        return []
    problem = _image_size_problem(size)
    if problem:
        report.skip(path, problem)
        return []
    try:
        if config.verify:
            load_rgb(path)
    except Exception as exc:
        report.skip(path, f"corrupt or truncated image ({exc}); re-save or remove it")
        return []
    item = _place(path, caption, repeats, size, 1, None, config, buckets, crop_rng, report)
    return [item] if item else []


# Decoding is refused above this many pixels (checked from the header, before any pixel is read):
# a 20000 x 20000 PNG would need 1.2 GB just to decode, and training crops it to ~1 MP anyway.
MAX_SOURCE_PIXELS = 100_000_000
MIN_SOURCE_SIDE = 8


def _image_size_problem(size: tuple[int, int]) -> str | None:
    h, w = size
    if h * w > MAX_SOURCE_PIXELS:
        return (f"too large to decode safely ({w}x{h} = {h * w / 1e6:.0f} MP, limit {MAX_SOURCE_PIXELS / 1e6:.0f} MP); "
                "downscale it first")
    if min(h, w) < MIN_SOURCE_SIDE:
        return f"too small ({w}x{h}); images need at least {MIN_SOURCE_SIDE} pixels per side"
    return None


def _clip_items(path, caption, repeats, config, buckets, crop_rng, report) -> list[DatasetItem]:
    clips = config.clips
    if not clips.wants_clips:
        report.skip(path, "video in a still-image dataset; set clip frames above 1 to train on videos")
        return []
    try:
        info = probe_video(path)
        if config.verify:
            decode_frames(path, [0])
    except Exception as exc:
        report.skip(path, f"unreadable video ({exc}); re-encode it (e.g. H.264 mp4) or remove it")
        return []
    frame_sets = clip_frame_indices(info, clips)
    if not frame_sets:
        at = f" at {clips.fps:g} fps" if clips.fps else ""
        report.skip(path, f"clip too short: {info.frame_count} frames{at} but a clip needs {clips.frames}")
        return []
    items = [_place(path, caption, repeats, info.size, clips.frames, frames, config, buckets, crop_rng, report)
             for frames in frame_sets]
    return [item for item in items if item]


def _place(path, caption, repeats, size, t, frame_indices, config, buckets, crop_rng, report) -> DatasetItem | None:
    bucket = bucket_for(size, config.buckets, buckets)
    if bucket is None:
        report.skip(path, f"too small ({size[0]}x{size[1]}) for a {config.buckets.step}-pixel bucket step")
        return None
    resize_to, crop = fit(size, bucket, config.buckets.random_crop, crop_rng)
    return DatasetItem(path=path, caption_raw=caption, repeats=repeats, bucket=(*bucket, t), source_size=size,
                       resize_to=resize_to, crop=crop, frame_indices=frame_indices)
