"""Pivotal tuning nodes: the settings of the trigger word's new embedding that Dojo Train LoRA trains with
the LoRA, and the embedding taken back out of the trained (or loaded) LoRA."""
from __future__ import annotations

from .comfy_compat import io
from .te_lora import PivotalJob
from .ti_training import check_embedding_name
from .types import EmbeddingType, PivotalType


class DojoPivotalEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoPivotalEmbedding",
            display_name="Dojo Pivotal Embedding",
            category="Dojo/train",
            description="Pivotal tuning (SD1.5 / SDXL): connect to Dojo Train LoRA's 'pivotal' input (and its "
                        "'clip'). The trigger word becomes a new embedding trained together with the LoRA; "
                        "use the pair with the LoRA loaded and embedding:<name> in the prompt.",
            inputs=[
                io.String.Input("embedding_name", default="my_token",
                                tooltip="The embedding's name: prompts say embedding:<name>. Letters, digits, _ and -."),
                io.String.Input("trigger_word", default="",
                                tooltip="The word in the captions the embedding replaces (empty = the dataset's "
                                        "trigger word or {token}; captions without it get the embedding in front)."),
                io.Int.Input("num_vectors", default=2, min=1, max=16,
                             tooltip="Vectors (tokens) per text encoder; 1-4 is usual."),
                io.String.Input("init_word", default="*",
                                tooltip="The vectors start as this word's token embeddings, e.g. 'dog', 'person'."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-7, max=10.0, step=1e-5,
                               tooltip="The embedding's own learning rate (the LoRA keeps Train LoRA's)."),
                io.Float.Input("train_fraction", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="The embedding trains for this fraction of the steps, then stays fixed "
                                       "while the LoRA goes on (e.g. 0.5)."),
            ],
            outputs=[PivotalType.Output(display_name="pivotal", tooltip="For Dojo Train LoRA's pivotal input.")],
        )

    @classmethod
    def execute(cls, embedding_name, trigger_word, num_vectors, init_word, learning_rate, train_fraction
                ) -> io.NodeOutput:
        return io.NodeOutput(PivotalJob(check_embedding_name(embedding_name), num_vectors, init_word or "*",
                                        learning_rate, train_fraction, (trigger_word or "").strip()))


class DojoLoRAEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoLoRAEmbedding",
            display_name="Dojo LoRA Embedding",
            category="Dojo/embedding",
            description="The embedding a LoRA carries (trained with it by pivotal tuning, or bundled in a loaded "
                        "file), for Dojo Apply Embedding / Save Embedding.",
            inputs=[io.LoraModel.Input("lora", tooltip="A LoRA from Dojo Train LoRA (with pivotal) or Dojo Load LoRA.")],
            outputs=[EmbeddingType.Output(display_name="embedding", tooltip="The LoRA's embedding.")],
        )

    @classmethod
    def execute(cls, lora) -> io.NodeOutput:
        embedding = getattr(lora, "embedding", None)
        if embedding is None:
            saved = getattr(lora, "metadata", {}).get("dojo_embedding_file")
            if saved:
                raise ValueError(f"this LoRA file does not bundle its embedding: Dojo Save LoRA wrote it as its "
                                 f"own file, {saved.split(':', 1)[-1]} in models/embeddings; load that with Dojo "
                                 f"Load Embedding, or use {saved} in the prompt")
            raise ValueError("this LoRA carries no embedding: train it with a Dojo Pivotal Embedding connected to "
                             "Dojo Train LoRA's pivotal input, or load a file that bundles one")
        return io.NodeOutput(embedding)
