"""ComfyUI-Dojo's nodes (ComfyUI V3 schema). Node ids are stable: saved workflows store them."""
from __future__ import annotations

from .comfy_compat import ComfyExtension, io
from .caption_nodes import DojoCaptionImages, DojoDatasetImages, DojoSetCaptions, DojoWriteCaptions
from .dataset_nodes import DojoEncodeDataset, DojoLoadImageDataset
from .embedding_nodes import DojoApplyEmbedding, DojoLoadEmbedding, DojoSaveEmbedding, DojoTrainTextualInversion
from .grid_nodes import DojoLoRAGrid
from .lora_nodes import DojoApplyLoRA, DojoLoadLoRA, DojoSaveLoRA
from .memory_nodes import DojoEstimateMemory
from .model_info import DojoModelInfo
from .pivotal import DojoLoRAEmbedding, DojoPivotalEmbedding
from .share_nodes import DojoAdapterInfo, DojoExportModelCard, DojoPublishToHub
from .train_lora import DojoTrainLoRA

NODES: list[type[io.ComfyNode]] = [
    DojoLoadImageDataset,
    DojoEncodeDataset,
    DojoDatasetImages,
    DojoSetCaptions,
    DojoCaptionImages,
    DojoWriteCaptions,
    DojoTrainLoRA,
    DojoApplyLoRA,
    DojoSaveLoRA,
    DojoLoadLoRA,
    DojoLoRAGrid,
    DojoTrainTextualInversion,
    DojoApplyEmbedding,
    DojoSaveEmbedding,
    DojoLoadEmbedding,
    DojoPivotalEmbedding,
    DojoLoRAEmbedding,
    DojoModelInfo,
    DojoEstimateMemory,
    DojoAdapterInfo,
    DojoExportModelCard,
    DojoPublishToHub,
]


class DojoExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
