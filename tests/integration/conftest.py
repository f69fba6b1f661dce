import pytest

from comfy_harness import ComfyUI, comfyui_available, comfyui_path, make_base_directory

ENABLE_HINT = ("integration tier skipped: no ComfyUI tree at {path}. Set COMFYUI_PATH to a ComfyUI checkout "
               "(../shared/comfyui/setup.sh installs one) to run it.")


def pytest_collection_modifyitems(config, items):
    if comfyui_available():
        return
    skip = pytest.mark.skip(reason=ENABLE_HINT.format(path=comfyui_path()))
    for item in items:
        if "integration" in item.nodeid.split("::")[0]:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not comfyui_available():
        terminalreporter.write_line(ENABLE_HINT.format(path=comfyui_path()))
    else:
        terminalreporter.write_line(f"integration tier ran against ComfyUI at {comfyui_path()}")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyUI:
    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"))
    return ComfyUI(comfyui_path(), base)
