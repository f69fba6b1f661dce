"""ComfyUI-Dojo's nodes (ComfyUI V3 schema). Node ids are stable: saved workflows store them."""
from __future__ import annotations

from .comfy_compat import ComfyExtension, io
from .dataset_nodes import DojoEncodeDataset, DojoLoadImageDataset
from .model_info import DojoModelInfo

NODES: list[type[io.ComfyNode]] = [
    DojoModelInfo,
    DojoLoadImageDataset,
    DojoEncodeDataset,
]


class DojoExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
