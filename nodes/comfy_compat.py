"""Every ComfyUI import the pack makes lives here, so that ComfyUI version differences have one home.

Supported: ComfyUI 0.8.0 (oldest) to 0.33.x (main target). Node modules import `io` and helpers from
this module, never from ComfyUI directly.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import weakref
from contextlib import contextmanager

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils
import folder_paths  # noqa: F401  (re-exported for the file-handling nodes)
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401  (re-exported)

from ..training import families
from ..training.families import FamilyLike, FamilySpec, generic
from ..training.families.generic import ComfyModelFacts
from ..training.protocol import Family, NoiseSchedule, Prediction


class UnsupportedModelError(ValueError):
    pass


def model_spec(model_patcher) -> FamilySpec:
    """The family spec of a MODEL: the registered family whose ComfyUI model config (comfy.supported_models
    class, by exact name) it is. This is the one place a MODEL is told apart; a model no family claims
    is where generic mode (training/families/generic.py) hooks in."""
    spec = families.spec_for_config(config_name(model_patcher))
    return spec if spec is not None else generic_spec(model_patcher)


def model_family(model_patcher) -> Family:
    return model_spec(model_patcher).family


# --- generic mode: a spec built from the model for configs no family module claims ------------------

_GENERIC_SPECS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _base_model(model):
    """ComfyUI's BaseModel of a ModelPatcher (or the BaseModel itself)."""
    return model.model if hasattr(model, "model_options") else model


def config_name(model_patcher) -> str:
    """The comfy.supported_models class ComfyUI detected the model as ("SD3", "LTXV", "Flux", ...)."""
    return type(_base_model(model_patcher).model_config).__name__


def model_facts(model_patcher) -> ComfyModelFacts:
    """What ComfyUI knows about a loaded model that generic mode needs (names for messages and files,
    the latent layout). 0.8's latent formats do not say their downscale ratios: 8 (and 1) then."""
    base = _base_model(model_patcher)
    latent = base.latent_format
    return ComfyModelFacts(
        config_name=config_name(model_patcher), model_class=type(base).__name__,
        network_class=type(base.diffusion_model).__name__, latent_channels=int(latent.latent_channels),
        latent_dims=int(getattr(latent, "latent_dimensions", 2)),
        spatial_scale=int(getattr(latent, "spacial_downscale_ratio", 8)),
        temporal_scale=int(getattr(latent, "temporal_downscale_ratio", 1)))


def generic_spec(model_patcher) -> FamilySpec:
    """The generic-mode spec of a model no family module claims (training/families/generic.py), built
    once per diffusion network (clones share it) and announced in the log when built."""
    net = _base_model(model_patcher).diffusion_model
    spec = _GENERIC_SPECS.get(net)
    if spec is None:
        facts = model_facts(model_patcher)
        try:
            spec = generic.build_spec(net, facts)
        except generic.GenericModelError as e:
            raise UnsupportedModelError(str(e)) from e
        logging.getLogger("comfyui-dojo").info(generic.describe(spec, facts, net))
        _GENERIC_SPECS[net] = spec
    return spec


def generic_failures(model_patcher, spec: FamilySpec):
    """Around a generic-mode run: an autograd failure (the model cannot be run backward as ComfyUI runs
    it) becomes a GenericModelError naming the model. Nothing for a family with a module."""
    if not spec.generic:
        return contextlib.nullcontext()
    return generic.backward_failures_named(model_facts(model_patcher))


def noise_schedule(model_patcher) -> NoiseSchedule:
    """Read the prediction type and noise schedule from the model's own `model_sampling`."""
    sampling = model_patcher.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        shift = float(getattr(sampling, "shift", 1.0))
        if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
            # Flux's "shift" is mu of an exponential time shift; exp(mu) is the equivalent linear shift.
            shift = math.exp(shift)
        return NoiseSchedule(Prediction.FLOW, shift=shift)
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        prediction = Prediction.V
    elif isinstance(sampling, comfy.model_sampling.EPS):
        prediction = Prediction.EPSILON
    else:
        raise UnsupportedModelError(f"Dojo cannot train ComfyUI's '{config_name(model_patcher)}' model (class "
                                    f"{type(model_patcher.model).__name__}): its sampling is "
                                    f"{type(sampling).__name__}, not eps, v or flow prediction.")
    sigmas = sampling.sigmas.detach().to("cpu", torch.float64)
    return NoiseSchedule(prediction, alphas_cumprod=1.0 / (1.0 + sigmas ** 2))


def load_for_compute(model_patcher) -> None:
    """Let ComfyUI put the model (and the clone's patches) on its compute device."""
    comfy.model_management.load_models_gpu([model_patcher])


def compute_device(model_patcher) -> torch.device:
    return model_patcher.load_device


def comfy_sigma(model_patcher, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """ComfyUI's sigma for training time t: the VE sigma of the discrete timestep, or t itself for flow."""
    if schedule.is_flow:
        return t.float()
    sampling = model_patcher.get_model_object("model_sampling")
    return sampling.sigmas.to(t.device)[schedule.timestep_index(t)].float()


def model_kwargs(base_model, noisy: torch.Tensor, context, pooled, extra: dict) -> dict:
    """The keyword inputs ComfyUI's own `extra_conds` builds for this family (crossattn, y, guidance, ...)."""
    conds = base_model.extra_conds(noise=noisy, device=noisy.device, cross_attn=context,
                                   pooled_output=pooled, **extra)
    batch = noisy.shape[0]
    return {name: cond.process_cond(batch_size=batch, area=None).cond for name, cond in conds.items()}


@contextmanager
def raw_output_capture(base_model):
    """Record the network's raw output (before ComfyUI turns it into a denoised x0) for the calls made
    inside the block: a forward hook on the diffusion network, removed on exit. A diffusion-model wrapper
    would not do: only some networks (Flux, HunyuanVideo, ...) run ComfyUI's wrappers, SD3's MMDiT and
    others do not, and generic mode must see every network's output."""
    captured = {}

    def hook(module, args, output):
        captured["output"] = output

    handle = base_model.diffusion_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


# --- training on a MODEL --------------------------------------------------------------------------

def training_clone(model_patcher):
    """A patcher to train on. ComfyUI 0.33 may serve a "dynamic VRAM" patcher whose weights are managed
    by its allocator; training needs ordinary resident weights, so ask ComfyUI for a non-dynamic
    delegate (its own trainer does the same). Elsewhere a plain clone shares the module."""
    is_dynamic = getattr(model_patcher, "is_dynamic", None)
    if is_dynamic is not None and is_dynamic():
        return model_patcher.clone(disable_dynamic=True)
    return model_patcher.clone()


def materialize_inference_tensors(module: torch.nn.Module) -> int:
    """Replace parameters and buffers created under inference_mode with ordinary tensors, in place.

    ComfyUI loads weights inside `torch.inference_mode()`; autograd refuses to save such tensors for
    backward (they carry no version counter, which even a `.data` swap does not give back). Each one is
    replaced by a bit-identical ordinary copy (one tensor at a time, so no second copy of the model is
    held), keeping its requires_grad flag, so inference afterwards computes exactly the same values.
    Returns how many tensors were replaced.
    """
    replaced = 0
    with torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def check_latents_fit(model_patcher, family: FamilyLike, latent: torch.Tensor) -> None:
    """Refuse latents (one sample, no batch dimension) made by another family's VAE, in words, before a
    torch shape error deep in the model could say it less clearly."""
    spec = families.as_spec(family)
    want = model_patcher.model.latent_format.latent_channels
    video = spec.video
    # [C, T, H, W] where the model's latents have a time axis (video models; also Qwen-Image, whose Wan 2.1
    # VAE gives a still image one), [C, H, W] for image models: ComfyUI's latent format says which.
    want_dims = 1 + latent_dimensions(model_patcher, spec)
    if latent.shape[0] == want and latent.ndim == want_dims:
        return
    made = f"a {latent.shape[0]}-channel {'video' if latent.ndim == 4 else 'image'} VAE"
    raise ValueError(f"these latents come from {made}; this {spec.label} model needs "
                     f"its own {want}-channel {'video ' if video else ''}VAE: encode the dataset (Dojo Encode Dataset) "
                     "with the VAE that belongs to the model you train")


def latent_dimensions(model_patcher, spec: FamilySpec) -> int:
    """2 for image latents [C, H, W], 3 for latents with a time axis [C, T, H, W]: the model's latent format
    (ComfyUI's `latent_dimensions`), else the family's."""
    dims = getattr(model_patcher.model.latent_format, "latent_dimensions", None)
    return dims if dims in (2, 3) else (3 if spec.video else 2)


def process_latent_in(model_patcher, latent: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the model's latent space (scale/shift of its latent format)."""
    return model_patcher.model.process_latent_in(latent)


def sd_unet_diffusers_names(model_patcher) -> dict[str, str]:
    """ComfyUI UNet module name -> diffusers module name, from ComfyUI's own diffusers key map."""
    mapping = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    names = {}
    for diffusers_key, comfy_key in mapping.items():
        if diffusers_key.endswith(".weight") and comfy_key.endswith(".weight"):
            name = comfy_key[: -len(".weight")]
            # SDXL's label_emb has two diffusers names in ComfyUI's map (class_embedding, add_embedding),
            # and diffusers' kohya converter reads neither back; it keeps its own (sgm) name, as kohya's
            # SDXL files do, which ComfyUI and diffusers both load.
            names[name] = name if name.startswith("label_emb.") else diffusers_key[: -len(".weight")]
    return names


# --- progress and cancel ----------------------------------------------------------------------------

# Seeds of training nodes should stay put between queue runs (a new seed retrains from scratch): ComfyUI
# 0.33 lets a node ask for "fixed"; 0.8 only for the control widget, whose mode the user then sets.
SEED_CONTROL = io.ControlAfterGenerate.fixed if hasattr(io, "ControlAfterGenerate") else True


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def show_progress_text(text: str) -> None:
    """Text under the running node in ComfyUI's UI (the live loss); silent without a server."""
    try:
        import server
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        instance = getattr(server.PromptServer, "instance", None)
        if context is not None and instance is not None:
            instance.send_progress_text(text, context.node_id)
    except Exception as exc:  # never let a UI nicety break training
        logging.debug("Dojo: progress text not shown: %s", exc)


def preview_tuple(pil_image, max_size: int = 1024):
    """The form ComfyUI's progress hook sends as a node preview: PNG, shrunk to `max_size` only when larger
    (ComfyUI would also enlarge a smaller one, blurring a sample's pixels)."""
    return ("PNG", pil_image, max_size if max(pil_image.size) > max_size else None)


CAPTIONER_FOLDER = "captioners"


def captioner_folders() -> list[str]:
    """Model folders (transformers format, with a config.json) under models/captioners."""
    if CAPTIONER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CAPTIONER_FOLDER, os.path.join(folder_paths.models_dir, CAPTIONER_FOLDER))
    found = []
    for root in folder_paths.get_folder_paths(CAPTIONER_FOLDER):
        if os.path.isdir(root):
            found += sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json")))
    return found


def captioner_path(name: str) -> str | None:
    for root in folder_paths.get_folder_paths(CAPTIONER_FOLDER):
        candidate = os.path.realpath(os.path.join(root, name))
        if os.path.dirname(candidate) == os.path.realpath(root) and os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return None


def torch_device():
    return comfy.model_management.get_torch_device()


def output_directory() -> str:
    return folder_paths.get_output_directory()


def user_directory() -> str:
    return folder_paths.get_user_directory()


def comfyui_version() -> str:
    """ComfyUI's version string (its comfyui_version module), or 'unknown' in a tree without one."""
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except (ImportError, AttributeError):
        return "unknown"


def lora_directories() -> list[str]:
    return folder_paths.get_folder_paths("loras")


def lora_file_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_file_path(name: str) -> str | None:
    return folder_paths.get_full_path("loras", name)


def embedding_file_names() -> list[str]:
    return folder_paths.get_filename_list("embeddings")


def embedding_file_path(name: str) -> str | None:
    return folder_paths.get_full_path("embeddings", name)


GRAPH_HIDDEN_INPUTS = [io.Hidden.prompt, io.Hidden.extra_pnginfo]


def hidden_graph(node_cls) -> tuple[dict | None, dict | None]:
    """The running prompt (API JSON) and extra_pnginfo ({"workflow": UI JSON}) of a V3 node declared with
    `hidden=GRAPH_HIDDEN_INPUTS`; (None, None) when called outside an executing prompt."""
    hidden = getattr(node_cls, "hidden", None)
    return getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None)


def interrupt_requested() -> bool:
    return bool(comfy.model_management.processing_interrupted())


def is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, comfy.model_management.InterruptProcessingException)


def raise_interrupt():
    raise comfy.model_management.InterruptProcessingException()


# --- applying LoRAs -------------------------------------------------------------------------------

@contextmanager
def capture_lora_warnings():
    """Collect ComfyUI's "lora key not loaded" warnings while a LoRA is applied."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "lora key not loaded" in message:
                lines.append(message)

    handler = _Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lines
    finally:
        root.removeHandler(handler)


_PAIR_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


def lora_shape_mismatches(model, lora_state: dict) -> list[str]:
    """LoRA pairs whose shapes do not fit the model layer their key names (a LoRA for another size of
    the same family): ComfyUI would skip those weights at load time with only a log line."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    problems = []
    for down_suffix, up_suffix in _PAIR_SUFFIXES:
        for key in lora_state:
            if not key.endswith(down_suffix):
                continue
            base = key[: -len(down_suffix)]
            target = key_map.get(base)
            up = lora_state.get(base + up_suffix)
            if target is None or up is None or target not in weights:
                continue
            weight, down = weights[target], lora_state[key]
            if weight.ndim == 2 and (up.shape[0], down.shape[-1]) != tuple(weight.shape):
                problems.append(f"{base}: LoRA {tuple(up.shape[:1]) + tuple(down.shape[-1:])} vs model "
                                f"{tuple(weight.shape)}")
    return problems


def apply_lora(model, clip, lora_state: dict, strength_model: float, strength_clip: float):
    """ComfyUI's own LoRA application (the path LoraLoader takes), on clones of model and clip."""
    return comfy.sd.load_lora_for_models(model, clip, lora_state, strength_model, strength_clip)
def _rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (pair k = elements 2k, 2k+1) in plain, differentiable torch ops.
    freqs_cis [..., L, D/2, 2, 2] holds each pair's 2x2 rotation. Written as two broadcast products
    (out = R[..., 0] * x_even + R[..., 1] * x_odd) rather than one [..., 2, 2] product and a sum:
    half the intermediate size, and no reduction in backward."""
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if freqs_cis.ndim > 2 and x.ndim > 2 and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]:
        freqs_cis = freqs_cis[:, :, :x.shape[2]]
    out = torch.addcmul(freqs_cis[..., 0] * pairs[..., 0], freqs_cis[..., 1], pairs[..., 1])
    return out.reshape(x.shape).type_as(x)


def _rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


def rope_substitutions() -> dict:
    """comfy-kitchen's RoPE ops have no autograd formula and Flux / HunyuanVideo call them whenever
    comfy-kitchen is importable (always on 0.8; on 0.33 unless `in_training` is set), on CPU too.
    Map them to differentiable equivalents; the training protection applies this thread-locally."""
    try:
        kitchen = torch.ops.comfy_kitchen
        ops = {"apply_rope": (kitchen.apply_rope, _rope), "apply_rope1": (kitchen.apply_rope1, _rope1)}
    except (AttributeError, RuntimeError):  # comfy-kitchen not loaded: ComfyUI uses plain torch RoPE
        return {}
    subs = {}
    for packet, replacement in ops.values():
        subs[packet] = replacement
        for name in packet.overloads():
            subs[getattr(packet, name)] = replacement
    return subs


def has_training_flag() -> bool:
    """Whether this ComfyUI has `comfy.model_management.in_training` (0.33: models then take their own
    differentiable paths, RoPE among them; 0.8 has no such flag)."""
    return hasattr(comfy.model_management, "in_training")


def training_substitutions() -> dict:
    """The op substitutions a training region needs: none where ComfyUI's own training flag already
    routes RoPE through differentiable torch ops, ours where it cannot (0.8)."""
    return {} if has_training_flag() else rope_substitutions()


@contextmanager
def comfy_training_mode():
    """Set ComfyUI's own `in_training` flag for the duration of a training region (as its TrainLoraNode
    does around its loop) and put back the previous value, also on errors and cancel. A no-op where
    the flag does not exist. The flag is process-global; ComfyUI runs one prompt at a time, and the
    inference the flag is restored for runs after the region."""
    if not has_training_flag():
        yield False
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield True
    finally:
        comfy.model_management.in_training = previous


# --- datasets: folders, VAE and text encoding -------------------------------------------------------

DATASET_FOLDER_KEY = "dojo_datasets"


def register_dataset_folders() -> None:
    """Declare the `dojo_datasets` folder kind, which users fill from extra_model_paths.yaml
    (`dojo_datasets: /path/to/datasets`). ComfyUI reads that file before custom nodes load and then
    has already created the entry, so only a missing one is added (with no default folder)."""
    folder_paths.folder_names_and_paths.setdefault(DATASET_FOLDER_KEY, ([], set()))


def input_directory() -> str:
    return folder_paths.get_input_directory()


def dataset_roots() -> list[str]:
    """The folders configured under `dojo_datasets` (extra_model_paths.yaml), in ComfyUI's order."""
    register_dataset_folders()
    return list(folder_paths.folder_names_and_paths[DATASET_FOLDER_KEY][0])


def vae_time_factor(vae) -> int | None:
    """How many frames a video VAE folds into one latent frame (after the first), or None for an
    image VAE (which also encodes a clip frame by frame if asked, but Dojo refuses that)."""
    if getattr(vae, "latent_dim", 2) != 3 or getattr(vae, "not_video", False):
        return None
    formula = getattr(vae, "downscale_index_formula", None)
    return int(formula[0]) if formula else 1


def vae_encode(vae, frames: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAE.encode on frames [T, H, W, C] in [0, 1] (a batch of one image when T = 1, the
    frames of one clip for a video VAE, as ComfyUI's own video nodes pass them). Returns what the VAE
    gives, with its batch dimension: [1, C, h, w] or [1, C, t, h, w]."""
    return vae.encode(frames)


def vae_weights(vae):
    return vae.first_stage_model.state_dict().items()


# ComfyUI encodes a long prompt as consecutive 77-token chunks with no limit; a caption is cut to this
# many chunks (225 tokens, as much as A1111 reads by default) so one runaway caption cannot blow up the
# context length of every batch it lands in.
MAX_CAPTION_CHUNKS = 3


def clip_tokenize(clip, text: str, max_chunks: int = MAX_CAPTION_CHUNKS) -> tuple[dict, bool]:
    """Tokens as CLIPTextEncode makes them, cut to `max_chunks` chunks per encoder; (tokens, was_cut)."""
    tokens = clip.tokenize(text)
    cut = False
    for key, chunks in list(tokens.items()):
        if isinstance(chunks, list) and len(chunks) > max_chunks:
            tokens[key] = chunks[:max_chunks]
            cut = True
    return tokens, cut


def clip_encode(clip, text: str) -> tuple[torch.Tensor, dict]:
    """Encode one caption the way ComfyUI's CLIPTextEncode does (tokenize, then
    encode_from_tokens_scheduled), returning the cond tensor and its dict (pooled_output, ...).
    A caption longer than MAX_CAPTION_CHUNKS chunks is cut, with a warning naming it."""
    tokens, cut = clip_tokenize(clip, text)
    if cut:
        logging.warning("Dojo: a caption is longer than %d tokens and was cut to that length: '%s...'",
                        MAX_CAPTION_CHUNKS * 75, text[:80])
    scheduled = clip.encode_from_tokens_scheduled(tokens)
    if len(scheduled) != 1:
        raise ValueError(f"the CLIP carries scheduled hooks ({len(scheduled)} keyframes); Dojo caches one "
                         "conditioning per caption, so remove the CLIP hooks before encoding a dataset")
    cond, extra = scheduled[0]
    return cond, dict(extra)


def clip_weights(clip):
    return clip.cond_stage_model.state_dict().items()


def clip_settings(clip) -> dict:
    """The settings besides weights that change what a CLIP encodes (clip skip, applied patches).
    Patches (a LoRA on the text encoder) are identified by their patcher's uuid: conservative, a
    LoRA loaded again in a new session gets a new uuid and is encoded again."""
    patcher = getattr(clip, "patcher", None)
    patches = getattr(patcher, "patches", None) or {}
    return {"class": type(clip.cond_stage_model).__name__, "layer_idx": getattr(clip, "layer_idx", None),
            "patches": str(getattr(patcher, "patches_uuid", "")) if patches else ""}


def preview_ui(images: torch.Tensor, text: str) -> dict:
    """A node's UI output with preview images ([B, H, W, C] in [0, 1]) and text, both shown."""
    out = ui.PreviewImage(images, cls=None).as_dict()  # a preview carries no workflow metadata
    out["text"] = [text]
    return out


# --- textual inversion: embeddings spliced into ComfyUI's token lists -------------------------------
#
# ComfyUI's SDTokenizer.tokenize_with_weights resolves a word `embedding:<name>` through the tokenizer's
# `_try_get_embedding(name)`, which reads a file from `embedding_directory` and puts the file's rows, as
# tensors, into the token list in place of token ids; SDClipModel.process_tokens then concatenates those
# rows with the token embeddings (torch.cat, differentiable). Both 0.8 and 0.33 work this way. Dojo
# hooks in at the narrowest point: a CLIP clone gets a shallow copy of the tokenizer (and of its
# per-encoder SDTokenizers) whose `_try_get_embedding` answers Dojo's names from memory first and
# falls back to ComfyUI's own lookup. The shared tokenizer (clones share it) is never changed; the
# rest of the path, prompt weights and clip skip included, stays ComfyUI's.

_EMBEDDING_NAME_END = re.compile(r"[<\[]")
_TRY_GET_ARITY: dict[type, int] = {}


def clip_sub_tokenizers(tokenizer) -> dict[str, "comfy.sd1_clip.SDTokenizer"]:
    """Attribute name -> SDTokenizer for each text encoder of a CLIP's tokenizer (clip_l, clip_g...)."""
    return {name: t for name, t in vars(tokenizer).items() if isinstance(t, comfy.sd1_clip.SDTokenizer)}


def clip_encoder_keys(clip) -> list[str]:
    """The embedding keys of the CLIP's encoders as embedding files name them ("clip_l", "clip_g")."""
    return sorted(t.embedding_key for t in clip_sub_tokenizers(clip.tokenizer).values())


def _try_get_arity(tokenizer) -> int:
    """0.8's _try_get_embedding returns (embed, leftover), 0.33's (embed, name, leftover). Ask ComfyUI
    once per tokenizer class with a name no file can have (a NUL byte: every lookup is a miss)."""
    cls = type(tokenizer)
    if cls not in _TRY_GET_ARITY:
        _TRY_GET_ARITY[cls] = len(cls._try_get_embedding(tokenizer, "\x00dojo-probe"))
    return _TRY_GET_ARITY[cls]


def _match_embedding(word: str, table: dict):
    """Dojo's in-memory lookup, parsing `word` (what follows `embedding:`) as ComfyUI does: the first
    whitespace-separated word, cut at '<' or '[', trailing commas tolerated. Returns
    (vectors, name, leftover) or None."""
    parts = word.split()
    if not parts:
        return None
    name, leftover = parts[0], " ".join(parts[1:])
    cut = _EMBEDDING_NAME_END.search(name)
    if cut is not None:
        leftover = name[cut.start():] + (" " + leftover if leftover else "")
        name = name[:cut.start()]
    if name in table:
        return table[name], name, leftover
    stripped = name.rstrip(",")
    if stripped != name and stripped in table:
        return table[stripped], name, "{} {}".format(name[len(stripped):], leftover)
    return None


def _resolving_copy(tokenizer, table: dict):
    """A shallow copy of an SDTokenizer that resolves the names in `table` (name -> {key: [n, D]})
    from memory, then as ComfyUI does."""
    new = copy.copy(tokenizer)
    new._dojo_embeddings = {**getattr(tokenizer, "_dojo_embeddings", {}), **table}
    if new.embedding_directory is None:  # ComfyUI parses `embedding:` only when a directory is set
        new.embedding_directory = []
    arity = _try_get_arity(tokenizer)
    comfy_lookup = type(tokenizer)._try_get_embedding

    def _try_get_embedding(embedding_name: str):
        hit = _match_embedding(embedding_name, new._dojo_embeddings)
        if hit is None or new.embedding_key not in hit[0]:
            return comfy_lookup(new, embedding_name)
        vectors, name, leftover = hit
        embed = vectors[new.embedding_key]
        return (embed, name, leftover) if arity == 3 else (embed, leftover)

    new._try_get_embedding = _try_get_embedding
    return new


def clip_with_embeddings(clip, table: dict, for_training: bool = False):
    """A CLIP clone whose prompts resolve `embedding:<name>` for each name in `table` to the given
    vectors ({name: {"clip_l": [n, 768], "clip_g": [n, 1280]}}), without files and without touching
    the shared tokenizer. With `for_training`, a clone ComfyUI keeps resident (not dynamic)."""
    is_dynamic = getattr(clip.patcher, "is_dynamic", None)
    new = clip.clone(disable_dynamic=True) if for_training and is_dynamic is not None and is_dynamic() \
        else clip.clone()
    tokenizer = copy.copy(clip.tokenizer)
    for attr, sub in clip_sub_tokenizers(clip.tokenizer).items():
        setattr(tokenizer, attr, _resolving_copy(sub, table))
    new.tokenizer = tokenizer
    return new


def clip_token_rows(clip, key: str, word: str) -> torch.Tensor:
    """The token-embedding rows [k, D] (fp32 copy) of `word` in encoder `key` (init of new vectors)."""
    tokenizers = {t.embedding_key: t for t in clip_sub_tokenizers(clip.tokenizer).values()}
    tok = tokenizers[key]
    ids = tok.tokenizer(word)["input_ids"][tok.tokens_start:]
    if tok.tokenizer_adds_end_token:
        ids = ids[:-1]
    weight = getattr(clip.cond_stage_model, key).transformer.get_input_embeddings().weight
    with torch.inference_mode(False):
        return weight.detach()[torch.tensor(ids, dtype=torch.long, device=weight.device)].to("cpu", torch.float32).clone()


def prepare_clip_for_training(clip) -> None:
    """Load the CLIP and make its weights ordinary tensors (bit-identical copies; see
    materialize_inference_tensors) so that gradients can flow through it to spliced vectors."""
    comfy.model_management.load_models_gpu([clip.patcher])
    materialize_inference_tensors(clip.cond_stage_model)


def clip_encode_text(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """ComfyUI's own encode path (tokenize, encode_from_tokens: clip skip, weights, patches), keeping
    the autograd graph: (cond [1, L, D], pooled or None, other outputs)."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    cond, pooled = out.pop("cond"), out.pop("pooled_output", None)
    return cond, pooled, out


def clip_token_chunks(clip, text: str) -> int:
    """How many 77-token sections ComfyUI encodes `text` in (captions of different lengths differ)."""
    return max(len(v) for v in clip.tokenize(text).values())


def embedding_directories() -> list[str]:
    return folder_paths.get_folder_paths("embeddings")


def embedding_safetensors_names() -> list[str]:
    """The embeddings Dojo loads (safetensors only; the Info node lists every file)."""
    return [n for n in embedding_file_names() if n.endswith(".safetensors")]


# --- sampling: training previews and LoRA grids ----------------------------------------------------
# ComfyUI's own sampler (the KSampler node's path: comfy.sample), so previews and grid cells are what
# a KSampler with the same settings gives. 0.8's fix_empty_latent_channels takes no downscale ratios;
# its two-argument form is the same in both.

SAMPLER_NAMES = list(comfy.samplers.KSampler.SAMPLERS)
SCHEDULER_NAMES = list(comfy.samplers.KSampler.SCHEDULERS)


def empty_latent(model_patcher, width: int, height: int, frames: int = 1,
                 spec: FamilySpec | None = None) -> torch.Tensor:
    """An empty latent for the model, as EmptyLatentImage / EmptySD3LatentImage / EmptyHunyuanLatentVideo
    make them: [1, C, H/8, W/8], or for a video family [1, C, 1 + (frames - 1) / time scale, H/8, W/8]."""
    spec = spec or model_spec(model_patcher)
    channels = model_patcher.get_model_object("latent_format").latent_channels
    scale = spec.vae_scale
    if spec.video or latent_dimensions(model_patcher, spec) == 3:
        return torch.zeros([1, channels, (max(1, frames) - 1) // max(1, spec.vae_time_scale) + 1, height // scale,
                            width // scale])
    return torch.zeros([1, channels, height // scale, width // scale])


def ksample(model_patcher, positive, negative, latent: torch.Tensor, seed: int, steps: int, cfg: float,
            sampler_name: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """What the KSampler node computes for this latent (denoise 1), without its progress bar. Note that
    ComfyUI seeds the noise through the global RNG; callers that must not disturb it fork the RNG."""
    latent = comfy.sample.fix_empty_latent_channels(model_patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model_patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent, denoise=1.0, disable_pbar=True, seed=seed)


def vae_decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """VAEDecode's output: IMAGE frames [N, H, W, 3] (a video latent gives its frames)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


def encode_prompt(clip, text: str) -> list:
    """CLIPTextEncode's CONDITIONING for `text`."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def show_node_images(entries: list[dict], animated: bool) -> None:
    """Show files (entries of {filename, subfolder, type} as ComfyUI's /view serves them) on the running
    node now, with the "executed" message ComfyUI sends for a node's UI output; silent without a server."""
    try:
        import server
        from comfy_execution.utils import get_executing_context
        context = get_executing_context()
        instance = getattr(server.PromptServer, "instance", None)
        if context is None or instance is None:
            return
        output = {"images": entries, "animated": [animated]}
        instance.send_sync("executed", {"node": context.node_id, "display_node": context.node_id,
                                        "output": output, "prompt_id": context.prompt_id}, instance.client_id)
    except Exception as exc:  # never let a UI nicety break training
        logging.debug("Dojo: preview not shown: %s", exc)
