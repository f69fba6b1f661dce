"""The pack's own socket types. Their names are stored in saved workflows: never rename them."""
from .comfy_compat import io

DatasetType = io.Custom("DOJO_DATASET")
EncodedDatasetType = io.Custom("DOJO_ENCODED_DATASET")
# A textual-inversion embedding in memory (nodes.ti_training.DojoEmbedding): name, vectors, metadata.
EmbeddingType = io.Custom("DOJO_EMBEDDING")
# Pivotal-tuning settings for Dojo Train LoRA (nodes.te_lora.PivotalJob): the trigger word's new embedding.
PivotalType = io.Custom("DOJO_PIVOTAL")
