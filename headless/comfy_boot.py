"""Boot a ComfyUI tree inside this process, without its web server: what main.py does before it serves
(arguments, folders, extra model paths, custom nodes), so that prompts run through ComfyUI's own
validator and executor. One ComfyUI per process: it keeps global state (its `nodes` module,
folder_paths, model management).
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NODE = "DojoTrainLoRA"


class ComfyBootError(RuntimeError):
    pass


@dataclass
class BootedComfyUI:
    root: Path
    nodes: object            # ComfyUI's `nodes` module (NODE_CLASS_MAPPINGS, ...)
    execution: object        # ComfyUI's `execution` module (PromptExecutor, validate_prompt)
    folder_paths: object
    import_failures: list

    @property
    def version(self) -> str:
        try:
            import comfyui_version
            return comfyui_version.__version__
        except ImportError:
            return "unknown"


def check_tree(root: Path) -> Path:
    root = Path(root).expanduser().resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise ComfyBootError(f"{root} is not a ComfyUI folder (no main.py and comfy/ in it); pass --comfyui "
                             "with the folder you start ComfyUI from")
    return root


def boot_comfyui(root: Path, base_directory: Path | None = None, cpu: bool = False,
                 extra_model_paths: list[str] = (), output_directory: Path | None = None,
                 temp_directory: Path | None = None, load_pack: bool = True, server=None) -> BootedComfyUI:
    """Import ComfyUI from `root` with these settings and load its custom nodes (and this pack, if
    the tree's custom_nodes do not already have it). `server` stands in for ComfyUI's PromptServer
    (PromptServer.instance: progress text, node replacements; given the server's node_replace_manager)."""
    root = check_tree(root)
    # This pack's folder has a `nodes` package of its own: it must not shadow ComfyUI's `nodes` module.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (PACK_DIR, PACK_DIR / "headless")]
    sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (argument parsing stays off: ComfyUI parses [] when imported)
    from comfy.cli_args import args
    args.cpu = bool(cpu) or args.cpu
    args.disable_auto_launch = True
    if base_directory is not None:
        args.base_directory = str(Path(base_directory).resolve())
    # Next, as in main.py: ComfyUI's `utils` package must own that name before anything imports a `utils`
    # (in 0.8 a later import otherwise registers comfy/utils.py as `utils`, and server.py fails). It imports
    # folder_paths, which reads the arguments above.
    import utils.extra_config
    import folder_paths
    import nodes
    if Path(nodes.__file__).resolve().parent != root:
        raise ComfyBootError(f"imported the wrong 'nodes' module ({nodes.__file__}) instead of ComfyUI's in {root}")
    configs = ([str(root / "extra_model_paths.yaml")] if (root / "extra_model_paths.yaml").is_file() else []) \
        + list(extra_model_paths)
    for config in configs:
        utils.extra_config.load_extra_path_config(config)
    if output_directory is not None:
        folder_paths.set_output_directory(str(Path(output_directory).resolve()))
    if temp_directory is not None:
        folder_paths.set_temp_directory(str(Path(temp_directory).resolve()))
    if server is not None:
        install_server(server)
    custom = any(Path(p).is_dir() for p in folder_paths.get_folder_paths("custom_nodes"))
    failures = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom, init_api_nodes=False)) or []
    if load_pack and PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
        if PACK_NODE not in nodes.NODE_CLASS_MAPPINGS:
            raise ComfyBootError(f"ComfyUI could not load the Dojo nodes from {PACK_DIR}; see the log above")
    import execution
    return BootedComfyUI(root, nodes, execution, folder_paths, list(failures))


def install_server(stand_in) -> None:
    """Make `stand_in` ComfyUI's PromptServer.instance, which nodes and ComfyUI's own extensions reach for
    (progress text under a node; 0.33's built-in node replacements register with its manager)."""
    try:
        import server
    except Exception:  # a tree whose server cannot import (missing web dependencies) still runs prompts
        return
    try:
        from app.node_replace_manager import NodeReplaceManager
        stand_in.node_replace_manager = NodeReplaceManager()
    except ImportError:  # ComfyUI before node replacements
        pass
    server.PromptServer.instance = stand_in

