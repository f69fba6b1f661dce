"""Run a workflow's Dojo training without ComfyUI's UI, on one device or data-parallel on several
(`python -m comfyui_dojo.headless --help`). See run.py."""
