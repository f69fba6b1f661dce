"""ComfyUI's UI workflow format read against a booted ComfyUI's node schemas and converted to the API
format: the pack's own converter (headless/workflow.py, what `python -m comfyui_dojo.headless` uses),
re-exported for the tests."""
from comfyui_dojo.headless.workflow import (FRONTEND_ONLY, Input, Schema, node_info, schema,  # noqa: F401
                                            to_api, widget_inputs, widget_problems)
