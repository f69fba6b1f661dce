"""`python -m comfyui_dojo.headless ...`, or `python <pack>/headless/__main__.py ...` from a ComfyUI
custom_nodes checkout (the pack folder's name is not an importable package name there)."""
import sys

if not __package__:
    # Run as a script: load the pack folder as the package `comfyui_dojo` first.
    import importlib.util
    from pathlib import Path
    pack = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("comfyui_dojo", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_dojo"] = module
    spec.loader.exec_module(module)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    from comfyui_dojo.headless.run import main
else:
    from .run import main

if __name__ == "__main__":
    sys.exit(main())
