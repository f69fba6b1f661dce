"""Importing anything under training/ never imports a ComfyUI module."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import comfyui_dojo.training as training
from pack_import import PACK_IMPORT_SNIPPET

COMFY_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes",
                 "execution", "server", "node_helpers", "latent_preview")


def test_no_training_module_imports_comfyui():
    names = [m.name for m in pkgutil.walk_packages(training.__path__, "comfyui_dojo.training.")]
    assert names, "found no engine modules"
    code = PACK_IMPORT_SNIPPET + (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "import comfyui_dojo\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {COMFY_MODULES!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_engine_sources_do_not_mention_comfy_imports():
    root = Path(training.__file__).parent
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                head = stripped.split()[1].split(".")[0]
                assert head not in COMFY_MODULES, f"{path}: {stripped}"
