"""A Hugging Face model card (README.md with YAML front matter) for an adapter, from its metadata.

Pure text (no ComfyUI, no huggingface_hub): the export node writes what this returns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import families
from .families import FamilySpec
from .sharing import training_settings

LICENSES = ["other", "openrail++", "creativeml-openrail-m", "apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0",
            "flux-1-dev-non-commercial-license"]



def _spec(family: str) -> FamilySpec | None:
    """The registered spec of a file's `dojo_family`, or None (another tool's file, a family unknown here)."""
    try:
        return families.spec(family)
    except (KeyError, ValueError):
        return None


@dataclass
class CardInput:
    name: str
    adapter_file: str
    metadata: dict[str, str]
    license: str = "other"
    strength: float = 1.0
    trigger_word: str = ""
    base_model: str = ""
    samples: list[str] = field(default_factory=list)
    workflow_file: str | None = None


def _yaml_scalar(value: str) -> str:
    """A YAML-safe scalar: JSON strings are valid YAML double-quoted strings."""
    return json.dumps(str(value), ensure_ascii=False)


def front_matter(card: CardInput) -> dict:
    family = card.metadata.get("dojo_family", "")
    spec = _spec(family)
    base = card.base_model or (spec.metadata.hub_base_model if spec else "")
    tags = ["lora", "comfyui", "comfyui-dojo"] + ([family] if family else [])
    if spec is not None:
        tags.append("text-to-video" if spec.video else "text-to-image")
    data = {"license": card.license, "tags": tags}
    if base:
        data["base_model"] = base
    if card.trigger_word:
        data["instance_prompt"] = card.trigger_word
    data["pipeline_tag"] = "text-to-video" if spec is not None and spec.video else "text-to-image"
    if family:
        data["library_name"] = "diffusers"
    return data


def yaml_text(data: dict) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {_yaml_scalar(v)}" for v in value)
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines)


def settings_rows(metadata: dict[str, str]) -> list[tuple[str, str]]:
    rows = [(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in sorted(training_settings(metadata).items())]
    if not rows:
        for key in ("dojo_steps", "ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_num_train_images",
                    "ss_seed"):
            if metadata.get(key):
                rows.append((key, metadata[key]))
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(card: CardInput) -> str:
    meta = card.metadata
    family = meta.get("dojo_family", "")
    base = front_matter(card).get("base_model", "")
    spec = _spec(family)
    pipeline = spec.metadata.diffusers_pipeline if spec else "DiffusionPipeline"
    video = spec is not None and spec.video
    trigger = card.trigger_word
    prompt = f"{trigger}, " if trigger else ""
    out = ["---", yaml_text(front_matter(card)), "---", "", f"# {card.name}", ""]
    kind = spec.label if video else (family.upper() if family else "a diffusion model")
    out.append(f"A LoRA for {kind} trained in ComfyUI with [ComfyUI-Dojo](https://github.com/comfyui-dojo/ComfyUI-Dojo).")
    out.append("")
    if trigger:
        out += [f"**Trigger word:** `{trigger}` (put it in your prompt).", ""]
    out += [f"**Recommended strength:** {card.strength:g}", ""]
    if meta.get("dojo_base_model"):
        out += [f"**Trained on:** `{meta['dojo_base_model']}`", ""]
    if card.samples:
        out += ["## Samples", ""] + [f"![sample]({s})" for s in card.samples] + [""]
    out += [
        "## Use in ComfyUI", "",
        f"1. Put `{card.adapter_file}` into `ComfyUI/models/loras`.",
        f"2. Load your base model ({base or 'the base model it was trained on'}), then add **Dojo Apply LoRA** "
        f"(or ComfyUI's **LoraLoader** / **LoraLoaderModelOnly**) with strength {card.strength:g}.",
        f"3. Prompt with `{prompt}...`." if trigger else "3. Prompt as usual.",
    ]
    if card.workflow_file:
        out.append(f"4. Or drag `{card.workflow_file}` into ComfyUI to open the graph that trained it.")
    out += ["", "## Use with diffusers", "", "```python", "import torch",
            f"from diffusers import {pipeline}", "",
            f'pipe = {pipeline}.from_pretrained("{base or "<base model id>"}", torch_dtype=torch.bfloat16)',
            f'pipe.load_lora_weights(".", weight_name="{card.adapter_file}", adapter_name="{card.name}")',
            f'pipe.set_adapters(["{card.name}"], adapter_weights=[{card.strength:g}])',
            f'image = pipe("{prompt}a photo").images[0]' if not video
            else f'frames = pipe("{prompt}a video", num_frames=33).frames[0]',
            "```", ""]
    rows = settings_rows(meta)
    if rows:
        out += ["## Training settings", "", "| setting | value |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
        out.append("")
    out += [f"License: `{card.license}`" + (" (see the base model's license)" if card.license == "other" else "."), ""]
    return "\n".join(out)


def parse_front_matter(text: str) -> dict:
    """Read back the front matter written by `yaml_text` (for tests and tools without PyYAML)."""
    if not text.startswith("---\n"):
        return {}
    block = text[4:text.index("\n---", 4)]
    data: dict = {}
    key = None
    for line in block.splitlines():
        if line.startswith("- ") and key:
            data.setdefault(key, []).append(json.loads(line[2:]))
        elif ":" in line:
            key, _, value = line.partition(":")
            value = value.strip()
            if value:
                data[key] = json.loads(value)
    return data
