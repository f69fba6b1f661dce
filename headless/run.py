"""`python -m comfyui_dojo.headless WORKFLOW.json --comfyui PATH`: run a workflow's training without the UI.

One process (or one rank of `--nproc N` / torchrun) boots ComfyUI in-process, reads the workflow (UI or
API format), applies `--set` overrides and runs the part of the graph that trains (loaders, dataset,
encode, train, save) through ComfyUI's own validator and executor, so it writes what queueing the
graph in ComfyUI writes. Progress goes to stdout as plain lines; a node's error goes to stderr and
the exit status is not 0. Ctrl-C is ComfyUI's Cancel: the training node keeps a checkpoint.

Exit status: 0 done, 1 a node failed, 2 the workflow or an argument is unusable, 130 cancelled.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..training.distributed import DEFAULT_TIMEOUT_S, init_process_group, world_from_environment
from . import launch
from .comfy_boot import ComfyBootError, boot_comfyui
from .workflow import WorkflowError, ancestors, apply_overrides, load_workflow, schema_reader, title, training_part

OK, NODE_FAILED, UNUSABLE, CANCELLED = 0, 1, 2, 130
log = logging.getLogger("comfyui-dojo.headless")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m comfyui_dojo.headless",
        description="Run a ComfyUI workflow's Dojo training without the UI, on one or several devices.")
    p.add_argument("workflow", type=Path, help="workflow JSON: as ComfyUI saves it (UI format) or Export (API)")
    p.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH") or None,
                   help="the ComfyUI folder (with main.py); default $COMFYUI_PATH")
    p.add_argument("--base-directory", type=Path, default=None,
                   help="ComfyUI's --base-directory (models/, input/, output/); default the ComfyUI folder")
    p.add_argument("--output-directory", type=Path, default=None, help="ComfyUI's --output-directory")
    p.add_argument("--extra-model-paths-config", action="append", default=[], metavar="YAML",
                   help="extra_model_paths.yaml files to load, as ComfyUI's option of that name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget; NODE is a node id, title or type (e.g. DojoTrainLoRA.steps=500); repeatable")
    p.add_argument("--full", action="store_true",
                   help="run the whole workflow (sampling and image saving too), not only its training part")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu); data parallel then uses gloo")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (one per GPU); batch_size is the global batch")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a rank waits for the others in a collective (loading, encoding, each step) "
                        "before it gives up with an error")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's own log (model loading, tracebacks)")
    args = p.parse_args(argv)
    if args.comfyui is None:
        p.error("--comfyui PATH is required (or set COMFYUI_PATH): the ComfyUI folder to boot")
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    return args


class _QuietComfyErrors(logging.Filter):
    """ComfyUI logs a node's exception with its traceback and each validation failure; the runner
    prints the message itself, so these show only with --verbose."""
    PREFIXES = ("!!! Exception during processing", "Traceback", "Failed to validate prompt", "* ", "  - ",
                "Output will be ignored", "invalid prompt")

    def filter(self, record):
        return not record.getMessage().startswith(self.PREFIXES)


def setup_logging(verbose: bool, rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    if not verbose:
        handler.addFilter(_QuietComfyErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Every rank logs the same warnings; rank 0's are enough (the others still print their errors).
    root.setLevel(logging.INFO if verbose else logging.WARNING if rank == 0 else logging.ERROR)


def pick_device(world: int, local_rank: int, cpu: bool) -> None:
    """One GPU per rank: before ComfyUI initialises CUDA, make this rank see only its own device, so
    ComfyUI's model management and NCCL agree on it."""
    if world <= 1 or cpu or os.environ.get("DOJO_DEVICE_PICKED"):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        import torch
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        return  # no GPU: ComfyUI falls back to the CPU and the group to gloo
    if local_rank >= len(devices):
        raise SystemExit(f"rank with local rank {local_rank} has no GPU of its own ({len(devices)} visible); "
                         f"use --nproc {len(devices)} or fewer")
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank]
    os.environ["DOJO_DEVICE_PICKED"] = "1"


class Reporter:
    """The executor's server: turns ComfyUI's progress and messages into plain lines on stdout."""

    def __init__(self, quiet: bool, out=sys.stdout):
        self.prompt: dict = {}
        self.quiet, self.out = quiet, out
        self.client_id = None
        self.last_node_id = self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, dict]] = []
        self.node = None
        self.started: dict[str, tuple[float, int]] = {}   # node -> (time, value) of its first progress
        self.latest: dict[str, tuple[int, int]] = {}      # node -> (value, total)
        self._last_print = 0.0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    # the attributes and calls ComfyUI's executor and progress handlers use
    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if event == "executing" and data.get("node") is not None and data["node"] in self.prompt:
            self.node = data["node"]
            self.say(f"running {title(self.prompt, self.node)}")

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id=None, sid=None):
        node = str(node_id or self.node)
        value, total = self.latest.get(node, (0, 0))
        self.say(f"[{title(self.prompt, node) if node in self.prompt else node}] {text}{self.rate(node, value, total)}")

    def rate(self, node: str, value: int, total: int) -> str:
        if node not in self.started:
            return ""
        t0, v0 = self.started[node]
        if value <= v0:
            return ""
        per = (time.monotonic() - t0) / (value - v0)
        left = max(0, total - value) * per
        return f"  {per:.3g} s/step  ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    def progress_hook(self, value, total, preview=None, prompt_id=None, node_id=None):
        import comfy.model_management
        node = str(node_id or self.node)
        self.started.setdefault(node, (time.monotonic(), value))
        self.latest[node] = (value, total)
        comfy.model_management.throw_exception_if_processing_interrupted()  # as ComfyUI's own hook: a cancel point
        now = time.monotonic()
        if node in self.prompt and self.prompt[node]["class_type"] not in ("DojoTrainLoRA", "DojoTrainTextualInversion") \
                and (now - self._last_print >= 2 or value >= total):
            self._last_print = now
            self.say(f"[{title(self.prompt, node)}] {value}/{total}")

    def steps_summary(self, node: str) -> str:
        value, total = self.latest.get(node, (0, 0))
        if node not in self.started or value <= self.started[node][1]:
            return ""
        t0, v0 = self.started[node]
        took = time.monotonic() - t0
        return f"{value} steps; steps {v0 + 1}-{value} took {took:.1f} s ({took / (value - v0):.4f} s/step)"


def validation_message(prompt: dict, error: dict, node_errors: dict, folder_paths) -> str:
    lines = [f"the workflow does not validate: {error.get('message', error)}" if error else "the workflow does not validate"]
    for node_id, entry in node_errors.items():
        for reason in entry.get("errors", []):
            text = f"  {title(prompt, node_id) if node_id in prompt else node_id}: {reason.get('message')}: {reason.get('details')}"
            hint = file_hint(reason, folder_paths)
            lines.append(text + (f"\n    {hint}" if hint else ""))
    if not node_errors and error and error.get("details"):
        lines.append(f"  {error['details']}")
    return "\n".join(lines)


# Model-file inputs of ComfyUI's loaders -> the models/ folder they list (when a folder is empty its
# list is too, so the input's name says where the file belongs).
MODEL_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "vae_name": "vae", "lora_name": "loras",
                "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                "clip_name3": "text_encoders", "control_net_name": "controlnet", "embedding_name": "embeddings"}


def file_hint(reason: dict, folder_paths) -> str:
    """Where ComfyUI looks for a file or folder that a combo did not find."""
    if reason.get("type") != "value_not_in_list":
        return ""
    info = reason.get("extra_info") or {}
    name, config = info.get("input_name"), info.get("input_config")
    options = None
    if isinstance(config, (list, tuple)) and config:
        options = config[0] if isinstance(config[0], list) else \
            (config[1] or {}).get("options") if len(config) > 1 and isinstance(config[1], dict) else None
    if name == "folder":
        return (f"a dataset folder must be in ComfyUI's input directory ({folder_paths.get_input_directory()}) "
                "or a 'dojo_datasets' folder of extra_model_paths.yaml")
    kinds = [MODEL_INPUTS[name]] if name in MODEL_INPUTS else []
    if options:
        for kind in folder_paths.folder_names_and_paths:
            try:
                if kind != "custom_nodes" and sorted(folder_paths.get_filename_list(kind)) == sorted(options):
                    kinds.append(kind)
            except Exception:
                continue
    for kind in kinds:
        if kind in folder_paths.folder_names_and_paths:
            return f"put the file into one of ComfyUI's '{kind}' folders: {', '.join(folder_paths.get_folder_paths(kind))}"
    return "the value must be one of the choices ComfyUI lists for this input (files or folders it found)"


def run_rank(args) -> int:
    rank, world, local_rank = world_from_environment()
    setup_logging(args.verbose, rank)
    pick_device(world, local_rank, args.cpu)
    # Only rank 0 writes files: the other ranks' previews go to a private temp folder, removed at the end.
    private_temp = Path(tempfile.mkdtemp(prefix=f"dojo_rank{rank}_")) if rank else None
    reporter = Reporter(quiet=rank != 0)
    try:
        try:
            booted = boot_comfyui(args.comfyui, args.base_directory, args.cpu, args.extra_model_paths_config,
                                 args.output_directory, private_temp, server=reporter)
        except ComfyBootError as e:
            print(f"error: {e}", file=sys.stderr)
            return UNUSABLE
        schema_of = schema_reader(booted.nodes)
        try:
            prompt, ui_workflow = load_workflow(args.workflow, schema_of)
            if getattr(reporter, "node_replace_manager", None) is not None:
                reporter.node_replace_manager.apply_replacements(prompt)  # as the server does with a queued prompt
            for line in apply_overrides(prompt, args.overrides, schema_of):
                if rank == 0:
                    print(f"set {line}", flush=True)
            part = training_part(prompt, schema_of)
        except WorkflowError as e:
            print(f"error: {e}", file=sys.stderr)
            return UNUSABLE
        outputs = part.outputs if rank == 0 else part.trainers
        if args.full and rank == 0:
            outputs = [i for i, n in prompt.items() if schema_of(n["class_type"]).is_output]
        if world > 1:
            import torch
            backend = "nccl" if (not args.cpu and torch.cuda.is_available()) else "gloo"
            init_process_group(backend, args.timeout)
        return execute(booted, reporter, prompt, ui_workflow, outputs, rank)
    finally:
        if private_temp is not None:
            shutil.rmtree(private_temp, ignore_errors=True)
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def execute(booted, reporter: Reporter, prompt: dict, ui_workflow, outputs: list[str], rank: int) -> int:
    import asyncio

    import comfy.model_management
    import comfy.utils
    reporter.prompt = prompt
    # Validate only what runs: a sampler's missing file does not stop the training part.
    running = {i: prompt[i] for i in ancestors(prompt, outputs) | set(outputs)}
    valid, error, good, node_errors = asyncio.run(booted.execution.validate_prompt(str(uuid.uuid4()), running, None))
    if not valid or node_errors:
        if rank == 0:  # every rank validates the same files; one report is enough
            print("error: " + validation_message(running, error or {}, node_errors, booted.folder_paths), file=sys.stderr)
        return UNUSABLE
    comfy.utils.set_progress_bar_global_hook(reporter.progress_hook)
    executor = booted.execution.PromptExecutor(reporter, cache_type=False,
                                               cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    extra_data = {"client_id": "dojo-headless"}
    if ui_workflow is not None:
        extra_data["extra_pnginfo"] = {"workflow": ui_workflow}

    def cancel(signum, frame):
        # ComfyUI's Cancel: the running node sees its interrupt (the trainer checkpoints and stops).
        # In a data-parallel run the trainer replaces this handler with an agreed stop while it trains.
        if comfy.model_management.processing_interrupted():
            raise KeyboardInterrupt
        reporter.say("cancelling (Ctrl-C again to abort)")
        comfy.model_management.interrupt_current_processing()

    previous = signal.signal(signal.SIGINT, cancel)
    try:
        executor.execute(prompt, str(uuid.uuid4()), extra_data, outputs)
    finally:
        signal.signal(signal.SIGINT, previous)
    return report(reporter, executor, prompt, outputs, rank)


def report(reporter: Reporter, executor, prompt: dict, outputs: list[str], rank: int) -> int:
    events = {event: data for event, data in executor.status_messages}
    where = f"[rank {rank}] " if rank else ""
    if "execution_error" in events:
        data = events["execution_error"]
        node = str(data.get("node_id"))
        name = title(prompt, node) if node in prompt else node
        print(f"{where}error in {name}: {str(data.get('exception_message', '')).strip()}", file=sys.stderr)
        return NODE_FAILED
    if "execution_interrupted" in events:
        node = str(events["execution_interrupted"].get("node_id"))
        print(f"{where}cancelled in {title(prompt, node) if node in prompt else node}; a training node keeps its "
              "checkpoint in output/dojo_checkpoints (set its resume_from to continue)", file=sys.stderr)
        return CANCELLED
    if not executor.success:
        print(f"{where}the prompt failed", file=sys.stderr)
        return NODE_FAILED
    for node in outputs:
        summary = reporter.steps_summary(node)
        if summary:
            reporter.say(f"[{title(prompt, node)}] trained {summary}")
    ui = executor.history_result.get("outputs", {}) if hasattr(executor, "history_result") else {}
    for node in outputs:
        for text in (ui.get(node) or {}).get("text", []) if prompt[node]["class_type"].startswith("DojoSave") else []:
            reporter.say(f"[{title(prompt, node)}] saved {text}")
    reporter.say("done")
    return OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, _ = world_from_environment()
    if args.nproc > 1 and world == 1:
        return launch.launch(sys.argv[1:] if argv is None else argv, args.nproc, args.cpu)
    if world > 1 and args.nproc > 1 and args.nproc != world:
        print(f"error: --nproc {args.nproc} but this process is one of {world} ranks (torchrun?); "
              "drop --nproc under torchrun", file=sys.stderr)
        return UNUSABLE
    return run_rank(args)
