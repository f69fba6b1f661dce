"""Dojo Model Info: what Dojo will train on, read from the MODEL the graph loaded."""
from __future__ import annotations

from ..training.protocol import TargetPreset
from .comfy_compat import io
from .comfy_model import ComfyDenoisingModel


class DojoModelInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DojoModelInfo",
            display_name="Dojo Model Info",
            category="Dojo/utils",
            is_output_node=True,
            description="Shows how Dojo sees a MODEL: its family, its native prediction target and "
                        "noise schedule, and how many layers each LoRA target preset would adapt.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to inspect (from any ComfyUI loader)."),
            ],
            outputs=[
                io.String.Output(display_name="info", tooltip="A short multi-line description."),
            ],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        view = ComfyDenoisingModel(model)
        schedule = view.schedule
        lines = [
            f"family: {view.family.value}",
            f"prediction: {schedule.prediction.value}",
            f"shift: {schedule.shift:.3f}" if schedule.is_flow
            else f"timesteps: {schedule.alphas_cumprod.shape[0]}",
        ]
        for preset in TargetPreset:
            lines.append(f"layers for '{preset.value}': {len(view.adaptable_modules(preset))}")
        text = "\n".join(lines)
        return io.NodeOutput(text, ui={"text": [text]})
