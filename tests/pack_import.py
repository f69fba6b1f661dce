"""Make `comfyui_dojo` mean the checkout these tests live in (not whichever copy pip installed),
so that worktrees and CI clones test their own code. Imported by tests/conftest.py; scripts (bench/)
import it too."""
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PACK_IMPORT_SNIPPET = (
    "import importlib.util, sys\n"
    f"_spec = importlib.util.spec_from_file_location('comfyui_dojo', {str(REPO_ROOT / '__init__.py')!r}, "
    f"submodule_search_locations=[{str(REPO_ROOT)!r}])\n"
    "_mod = importlib.util.module_from_spec(_spec); sys.modules['comfyui_dojo'] = _mod; _spec.loader.exec_module(_mod)\n"
)

exec(PACK_IMPORT_SNIPPET)
