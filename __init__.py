"""ComfyUI-Dojo: train LoRAs and textual-inversion embeddings inside ComfyUI graphs.

ComfyUI loads this folder as a package and calls `comfy_entrypoint()`. The node modules are imported
only then, so the engine under `training/` can be imported (by tests, scripts, other tools) without
ComfyUI present.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import DojoExtension
    return DojoExtension()
