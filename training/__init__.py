"""ComfyUI-Dojo's training engine: plain PyTorch, no ComfyUI import anywhere under this package."""
