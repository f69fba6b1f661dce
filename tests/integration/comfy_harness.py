"""Boot a real ComfyUI tree in this process with the pack loaded as a custom node, and run API-format
prompts through ComfyUI's own validator and executor.

One ComfyUI per process: ComfyUI keeps global state (its `nodes` module, folder_paths, model
management). The tree comes from $COMFYUI_PATH, else ~/ComfyUI.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-Dojo"


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def comfyui_available() -> bool:
    root = comfyui_path()
    return (root / "main.py").is_file() and (root / "comfy").is_dir()


@dataclass
class RunningServer:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def comfyui_server(base: Path, log_path: Path, first_path: str = "/object_info", timeout_s: float = 180):
    """The real ComfyUI server (main.py) on a free 127.0.0.1 port with `base` as its base directory,
    up once `first_path` answers; stopped on exit. Yields the server and that first JSON answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes"],
            cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    server = RunningServer(f"http://127.0.0.1:{port}", log_path)
    try:
        answer, deadline = None, time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(server.url + first_path, timeout=5) as r:
                    answer = json.load(r)
                break
            except OSError:
                time.sleep(1)
        if answer is None:
            raise AssertionError(f"server did not answer on {server.url}:\n{server.log()[-3000:]}")
        yield server, answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_base_directory(base: Path) -> Path:
    """A ComfyUI base directory (models, input, output, temp, user, custom_nodes) with the pack
    linked into custom_nodes as a user would clone it."""
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return base


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, min_level=logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]


class _RecordingServer:
    """The few attributes ComfyUI's executor uses from its PromptServer."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class PromptResult:
    success: bool
    ui_outputs: dict
    messages: list = field(default_factory=list)
    validation_errors: dict = field(default_factory=dict)

    def error_message(self) -> str:
        for event, data in self.messages:
            if event == "execution_error":
                return f"{data.get('exception_type')}: {data.get('exception_message')}"
        return str(self.validation_errors)


class ComfyUI:
    """A booted ComfyUI: its modules, the loaded-node registry, and a prompt runner."""

    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = base
        self.log = _LogCapture()
        logging.getLogger().addHandler(self.log)
        logging.getLogger().setLevel(logging.INFO)

        # The runner's boot (what `python -m comfyui_dojo.headless` does): the pack comes from custom_nodes.
        from comfyui_dojo.headless.comfy_boot import boot_comfyui
        booted = boot_comfyui(root, base, cpu=True, load_pack=False)
        self.folder_paths, self.nodes = booted.folder_paths, booted.nodes
        self.import_failures = booted.import_failures
        self.boot_log_count = len(self.log.records)
        self.execution = booted.execution
        self.server = _RecordingServer()
        self.executor = self.execution.PromptExecutor(self.server, cache_type=False,
                                                      cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})

    def boot_messages(self, min_level=logging.WARNING) -> list[str]:
        """Log messages from booting ComfyUI and importing custom nodes (not from prompts run since)."""
        return [r.getMessage() for r in self.log.records[:self.boot_log_count] if r.levelno >= min_level]

    @property
    def version(self) -> str:
        import comfyui_version
        return comfyui_version.__version__

    def pack_module_name(self) -> str:
        return str(self.base / "custom_nodes" / PACK_DIR_NAME).replace(".", "_x_")

    def dojo_node_ids(self) -> list[str]:
        return sorted(k for k, cls in self.nodes.NODE_CLASS_MAPPINGS.items()
                      if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{PACK_DIR_NAME}")

    def widget_defaults(self, class_type: str) -> dict:
        """The default of every widget input of a node (what the UI would put in a new node)."""
        info = self.nodes.NODE_CLASS_MAPPINGS[class_type]
        spec = info.GET_NODE_INFO_V1()["input"] if hasattr(info, "GET_NODE_INFO_V1") else info.INPUT_TYPES()
        out = {}
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if "default" in options:
                    out[name] = options["default"]
                elif isinstance(entry[0], list) and entry[0]:
                    out[name] = entry[0][0]
        return out

    def node(self, class_type: str, **inputs) -> dict:
        """An API-format node with its widget defaults filled in and `inputs` on top."""
        return {"class_type": class_type, "inputs": {**self.widget_defaults(class_type), **inputs}}

    def run(self, prompt: dict, extra_pnginfo: dict | None = None) -> PromptResult:
        """Validate and execute an API-format prompt ({id: {class_type, inputs}}) like the server does.
        `extra_pnginfo` is what the UI sends along ({"workflow": UI JSON}), as extra_data["extra_pnginfo"]."""
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return PromptResult(False, {}, validation_errors={"error": error, "node_errors": node_errors})
        self.server.messages.clear()
        extra_data = {"client_id": "dojo-tests"}
        if extra_pnginfo is not None:
            extra_data["extra_pnginfo"] = extra_pnginfo
        self.executor.execute(prompt, prompt_id, extra_data, outputs)
        return PromptResult(self.executor.success, dict(self.executor.history_result.get("outputs", {})),
                            list(self.server.messages))
