"""Captions: sidecar files, trigger words, dropout and tag shuffling.

Every random choice takes an explicit `random.Random`, never the global RNG, so a seed reproduces
the exact captions of a run.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

TRIGGER_PLACEHOLDER = "[trigger]"


@dataclass(frozen=True)
class CaptionConfig:
    """How raw captions become the text a model is trained on.

    trigger: word(s) put in front of every caption, or substituted where a caption says `[trigger]`.
    dropout: probability that a caption is replaced by the trigger alone (or by "" when there is no
        trigger), which teaches the trigger to carry the concept on its own / trains unconditioned.
    shuffle: shuffle comma-separated tags, keeping the first `keep_tokens` tags in place.
    """
    trigger: str = ""
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    def __post_init__(self):
        if not 0.0 <= self.dropout <= 1.0:
            raise DatasetError(f"caption dropout must be between 0 and 1, got {self.dropout}")
        if self.keep_tokens < 0:
            raise DatasetError(f"keep_tokens must be >= 0, got {self.keep_tokens}")


def read_caption_file(path: Path) -> str:
    """The text of a caption sidecar, stripped. UTF-8 with or without BOM.

    A file that is not UTF-8 raises DatasetError rather than being guessed at or skipped: a wrongly
    decoded caption would silently train the model on mojibake, and re-saving as UTF-8 is easy.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"caption file {path} is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    return text.strip()


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags; the first `keep_tokens` stay in front, in order."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def apply_trigger(caption: str, trigger: str) -> str:
    """Substitute `[trigger]` where the caption has it, else prepend "trigger, caption".

    With no trigger word, a `[trigger]` placeholder is removed together with its comma.
    """
    trigger = trigger.strip()
    if TRIGGER_PLACEHOLDER in caption:
        if trigger:
            return caption.replace(TRIGGER_PLACEHOLDER, trigger)
        without = caption.replace(TRIGGER_PLACEHOLDER, "")
        return ", ".join(split_tags(without)) if "," in caption else re.sub(r"\s+", " ", without).strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    return f"{trigger}, {caption}"


def final_caption(raw: str | None, trigger: str, dropout: float, shuffle: bool, keep_tokens: int,
                  rng: random.Random) -> str:
    """The caption one training sample sees.

    raw None means "no caption file": the caption is the trigger alone. Dropout replaces the caption
    by the trigger alone (empty when there is no trigger). Shuffling happens before the trigger is
    prepended, so a prepended trigger always stays first. The rng is drawn the same number of times
    whatever the outcome, so one item's caption never shifts the randomness of the next.
    """
    dropped = rng.random() < dropout
    caption = raw or ""
    if shuffle:
        caption = shuffle_tags(caption, keep_tokens, rng)
    if dropped:
        return trigger.strip()
    return apply_trigger(caption, trigger)


def caption_with(config: CaptionConfig, raw: str | None, rng: random.Random) -> str:
    return final_caption(raw, config.trigger, config.dropout, config.shuffle, config.keep_tokens, rng)
