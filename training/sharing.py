"""What a saved adapter tells the people it is shared with: the training settings and the graph that made
it, scrubbed of absolute paths and secrets; and a readable summary of any adapter file's metadata.

Pure logic (no ComfyUI import). A save node calls `sharing_metadata(kind, metadata, prompt, extra_pnginfo)`
once, whatever it saves (LoRA, embedding).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

# Keys ComfyUI itself uses when it embeds a graph (PNG text chunks, SaveCheckpoint's metadata): the API
# prompt under "prompt", each extra_pnginfo entry (the UI "workflow") under its own name.
PROMPT_KEY = "prompt"
WORKFLOW_KEY = "workflow"
TRAINING_KEY = "dojo_training"
REDACTED = "<redacted>"

_SECRET_NAME = re.compile(r"(token|secret|password|passwd|api[_-]?key|auth|credential|cookie)", re.I)
_TOKEN_PATTERNS = re.compile(
    r"(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|"
    r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}|Bearer\s+[A-Za-z0-9._~+/-]{12,})")
_WHOLE_ABSOLUTE = re.compile(r"^(?:file://)?(?:/[^/\s]|~[/\\]|[A-Za-z]:[\\/]|\\\\[^\\])")
_EMBEDDED_ABSOLUTE = re.compile(
    r"(?:(?<![\w.~/-])/(?:home|root|Users|mnt|media|tmp|var|opt|srv|data|workspace|workspaces|content|"
    r"private|Volumes|usr|etc|run|scratch)/[^\s\"'<>|]+|(?<![\w])[A-Za-z]:\\[^\s\"'<>|]+)")


def _secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (HF_TOKEN, *_API_KEY, ...)."""
    return sorted((v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8), key=len,
                  reverse=True)


def _basename(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or "(path removed)"


def is_absolute_path(text: str) -> bool:
    """A string that is an absolute path (POSIX, home-relative, Windows drive or UNC), one line."""
    t = text.strip()
    if "\n" in t or not _WHOLE_ABSOLUTE.match(t):
        return False
    return t.startswith(("~", "\\\\", "file://")) or "/" in t[1:] or "\\" in t or (len(t) > 1 and t[1] == ":")


def scrub_text(text: str, secrets: list[str] | None = None) -> str:
    """Absolute paths -> their last component; tokens and secret environment values -> <redacted>."""
    secrets = _secret_env_values() if secrets is None else secrets
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _TOKEN_PATTERNS.sub(REDACTED, text)
    if is_absolute_path(text):
        return _basename(text.strip())
    return _EMBEDDED_ABSOLUTE.sub(lambda m: _basename(m.group(0)), text)


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """A JSON-like structure with every string scrubbed and every secret-named key dropped."""
    secrets = _secret_env_values() if secrets is None else secrets
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {scrub_text(str(k), secrets): scrub(v, secrets) for k, v in value.items()
                if not (isinstance(k, str) and _SECRET_NAME.search(k))}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def training_settings(metadata: dict[str, str]) -> dict:
    """The trainer's settings (`dojo_training`), or {} when absent or unreadable."""
    try:
        settings = json.loads(metadata.get(TRAINING_KEY, "") or "{}")
    except (TypeError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


_MODEL_INPUTS = ("ckpt_name", "unet_name")


def base_model_from_prompt(prompt: dict | None) -> str | None:
    """The model file the graph loaded, when it loaded exactly one (CheckpointLoaderSimple / UNETLoader)."""
    if not isinstance(prompt, dict):
        return None
    names = {node["inputs"][key] for node in prompt.values() if isinstance(node, dict)
             and isinstance(node.get("inputs"), dict) for key in _MODEL_INPUTS
             if isinstance(node["inputs"].get(key), str)}
    return _basename(names.pop()) if len(names) == 1 else None


def sharing_metadata(kind: str, metadata: dict, prompt: dict | None = None,
                     extra_pnginfo: dict | None = None) -> dict[str, str]:
    """The metadata a save node writes: `metadata` (the trainer's and the node's keys) plus the adapter
    kind, the graph (`prompt` = API JSON, `workflow` and any other extra_pnginfo entry = UI JSON) and the
    base model name when the graph shows it; every value scrubbed of absolute paths and secrets."""
    secrets = _secret_env_values()
    out = {str(k): scrub_text(v if isinstance(v, str) else json.dumps(v, sort_keys=True), secrets)
           for k, v in metadata.items() if not _SECRET_NAME.search(str(k))}
    out["dojo_kind"] = kind
    if "dojo_base_model" not in out:
        guessed = base_model_from_prompt(prompt)
        if guessed:
            out["dojo_base_model"] = guessed
            out.setdefault("ss_sd_model_name", guessed)
    if isinstance(prompt, dict):
        out[PROMPT_KEY] = json.dumps(scrub(prompt, secrets))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            if isinstance(key, str) and not _SECRET_NAME.search(key) and key not in out:
                out[key] = json.dumps(scrub(value, secrets))
    return out


# --- reading: a summary for people -------------------------------------------------------------------

_LABELS = [
    ("dojo_kind", "kind"), ("dojo_family", "model family"), ("ss_base_model_version", "base model version"),
    ("dojo_base_model", "base model"), ("ss_sd_model_name", "base model file"), ("dojo_trigger_word", "trigger word"),
    ("dojo_steps", "steps trained"), ("ss_max_train_steps", "steps planned"), ("ss_steps", "steps"),
    ("ss_epoch", "epochs"), ("ss_network_module", "network module"), ("ss_network_dim", "network dim (rank)"),
    ("ss_network_alpha", "network alpha"), ("ss_learning_rate", "learning rate"), ("ss_unet_lr", "UNet lr"),
    ("ss_text_encoder_lr", "text encoder lr"), ("ss_optimizer", "optimizer"), ("ss_lr_scheduler", "lr scheduler"),
    ("ss_num_train_images", "training images"), ("ss_resolution", "resolution"), ("ss_seed", "seed"),
    ("ss_mixed_precision", "precision"), ("dojo_dataset", "dataset"), ("dojo_version", "Dojo version"),
    ("ss_training_comment", "comment"),
]


def tag_frequency_summary(raw: str, top: int = 15) -> str | None:
    """kohya's ss_tag_frequency ({dataset: {tag: count}}) -> 'tag (n), ...' for the most frequent tags."""
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None
    counts: Counter = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[str(tag).strip()] += int(n)
    if not counts:
        return None
    shown = ", ".join(f"{tag} ({n})" for tag, n in counts.most_common(top))
    more = len(counts) - min(top, len(counts))
    return shown + (f", ... and {more} more tags" if more else "")


def describe_metadata(name: str, metadata: dict[str, str] | None, tensor_count: int | None = None) -> str:
    """A readable report of an adapter file's metadata (Dojo's keys and kohya's ss_* keys)."""
    lines = [f"{name}"]
    if tensor_count is not None:
        lines.append(f"tensors: {tensor_count}")
    if not metadata:
        lines.append("This file carries no metadata (nothing recorded about how it was trained).")
        return "\n".join(lines)
    for key, label in _LABELS:
        value = metadata.get(key)
        if value not in (None, "", "None"):
            lines.append(f"{label}: {value}")
    settings = training_settings(metadata)
    if settings:
        lines.append("training settings:")
        lines.extend(f"  {k}: {v}" for k, v in sorted(settings.items()))
    tags = tag_frequency_summary(metadata.get("ss_tag_frequency", ""))
    if tags:
        lines.append(f"most frequent caption tags: {tags}")
    if PROMPT_KEY in metadata or WORKFLOW_KEY in metadata:
        parts = []
        try:
            parts.append(f"{len(json.loads(metadata[PROMPT_KEY]))} nodes (API prompt)")
        except (KeyError, TypeError, ValueError):
            pass
        try:
            parts.append(f"{len(json.loads(metadata[WORKFLOW_KEY]).get('nodes', []))} nodes (UI workflow)")
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        lines.append("training graph embedded: " + (", ".join(parts) or "yes"))
    shown = {k for k, _ in _LABELS} | {TRAINING_KEY, "ss_tag_frequency", PROMPT_KEY, WORKFLOW_KEY}
    others = sorted(k for k in metadata if k not in shown)
    if others:
        lines.append("other keys:")
        for key in others:
            value = str(metadata[key])
            lines.append(f"  {key}: {value if len(value) <= 120 else value[:117] + '...'}")
    return "\n".join(lines)
