"""Clips: probe a video's frame timestamps cheaply, choose which frames form each clip, decode them.

A clip is `frames` consecutive frames of the (optionally fps-resampled) frame sequence. Some
families only take certain lengths: HunyuanVideo's causal VAE compresses time by 4 and keeps the
first frame, so clips must have 4k+1 frames.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import av
from PIL import Image

from ..families import FamilyLike, as_spec
from .errors import DatasetError

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv"})


class FrameRule(str, enum.Enum):
    ANY = "any"
    FOUR_K_PLUS_1 = "4k+1"

    def allows(self, frames: int) -> bool:
        if frames < 1:
            return False
        return self is FrameRule.ANY or frames % 4 == 1

    @classmethod
    def for_family(cls, family: FamilyLike | None) -> "FrameRule":
        """The family spec's frame rule (training/families); ANY for no family."""
        return cls.ANY if family is None else cls(as_spec(family).frames_rule)


class ClipMode(str, enum.Enum):
    HEAD = "head"          # one clip from the first frame
    UNIFORM = "uniform"    # `clips_per_video` clips spread evenly over the video
    SLIDING = "sliding"    # a clip starting every `stride` frames


@dataclass(frozen=True)
class ClipConfig:
    """frames: frames per clip (1 means a dataset of stills: videos are ignored, GIFs give their first
    frame); frame_rule: lengths the model family accepts; mode / clips_per_video / stride: where clips
    start; fps: resample sources to this rate by timestamps first (None keeps every frame)."""
    frames: int = 1
    frame_rule: FrameRule = FrameRule.ANY
    mode: ClipMode = ClipMode.HEAD
    clips_per_video: int = 1
    stride: int | None = None
    fps: float | None = None

    def __post_init__(self):
        rule = FrameRule(self.frame_rule)
        object.__setattr__(self, "frame_rule", rule)
        object.__setattr__(self, "mode", ClipMode(self.mode))
        if not rule.allows(self.frames):
            lower = max(1, (self.frames - 1) // 4 * 4 + 1)
            near = sorted({lower, lower + 4})
            raise DatasetError(
                f"clips of {self.frames} frames do not fit this model: it needs 4k+1 frames "
                f"(1, 5, 9, ... 33, 49, ...); use {' or '.join(map(str, near))}" if rule is FrameRule.FOUR_K_PLUS_1
                else f"clip length must be at least 1 frame, got {self.frames}")
        if self.clips_per_video < 1:
            raise DatasetError(f"clips_per_video must be at least 1, got {self.clips_per_video}")
        if self.stride is not None and self.stride < 1:
            raise DatasetError(f"sliding-window stride must be at least 1, got {self.stride}")
        if self.fps is not None and self.fps <= 0:
            raise DatasetError(f"target fps must be positive, got {self.fps}")

    @property
    def wants_clips(self) -> bool:
        return self.frames > 1


@dataclass(frozen=True)
class VideoInfo:
    size: tuple[int, int]           # (height, width)
    timestamps: tuple[float, ...]   # presentation time of every frame in seconds, ascending

    @property
    def frame_count(self) -> int:
        return len(self.timestamps)


def probe_video(path: Path) -> VideoInfo:
    """Size and frame timestamps from the container's packets, without decoding pictures.

    Raises av.FFmpegError / DatasetError for unreadable files or files without a video stream."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DatasetError(f"{path} has no video stream")
        stream = container.streams.video[0]
        base = stream.time_base
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
        size = (stream.codec_context.height, stream.codec_context.width)
    if not pts or min(size) <= 0:
        raise DatasetError(f"{path} has no decodable video frames")
    return VideoInfo(size=size, timestamps=tuple(float((p - pts[0]) * base) for p in pts))


def resample(timestamps: Sequence[float], fps: float | None) -> list[int]:
    """Indices of the source frames nearest to the instants 0, 1/fps, 2/fps ... within the video
    (every frame when fps is None). A lower fps drops frames; a higher one repeats them."""
    if fps is None:
        return list(range(len(timestamps)))
    if not timestamps:
        return []
    last = timestamps[-1] + (timestamps[-1] - timestamps[-2] if len(timestamps) > 1 else 0.0) / 2
    picked, j = [], 0
    instant_index = 0
    while True:
        instant = instant_index / fps
        if instant > last + 1e-9:
            break
        while j + 1 < len(timestamps) and abs(timestamps[j + 1] - instant) <= abs(timestamps[j] - instant):
            j += 1
        picked.append(j)
        instant_index += 1
    return picked


def clip_starts(available: int, config: ClipConfig) -> list[int]:
    """Start positions (into the resampled sequence) of the clips of one video; [] when it is shorter
    than one clip."""
    span = available - config.frames
    if span < 0:
        return []
    if config.mode is ClipMode.HEAD:
        return [0]
    if config.mode is ClipMode.UNIFORM:
        n = config.clips_per_video
        if n == 1:
            return [span // 2]
        return sorted({round(i * span / (n - 1)) for i in range(n)})
    stride = config.stride or config.frames
    return list(range(0, span + 1, stride))


def clip_frame_indices(info: VideoInfo, config: ClipConfig) -> list[tuple[int, ...]]:
    """For each clip, the source-frame indices it is made of."""
    sequence = resample(info.timestamps, config.fps)
    return [tuple(sequence[s:s + config.frames]) for s in clip_starts(len(sequence), config)]


def decode_frames(path: Path, indices: Sequence[int]) -> list[Image.Image]:
    """The RGB frames at source-frame `indices` (repeats allowed), decoding the file once in order.

    Frames are matched by presentation order (sorted timestamps), the same numbering as probe_video."""
    wanted = set(indices)
    last = max(wanted)
    by_index: dict[int, Image.Image] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # Decoder output is in presentation order (the decoder undoes B-frame reordering).
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                by_index[i] = frame.to_image().convert("RGB")
            if i >= last:
                break
    missing = sorted(wanted - by_index.keys())
    if missing:
        raise DatasetError(f"{path}: could not decode frames {missing[:5]} (file truncated or changed "
                           "since the scan?); re-encode it or remove it from the folder")
    return [by_index[i] for i in indices]
