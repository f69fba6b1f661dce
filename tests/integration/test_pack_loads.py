"""ComfyUI starts with the pack loaded, without import errors, and registers every Dojo node."""
import importlib
import sys

import pytest

from comfy_harness import PACK_DIR_NAME, comfyui_server, make_base_directory

pytestmark = pytest.mark.integration


def expected_node_ids(comfy):
    pack = sys.modules[comfy.pack_module_name()]
    nodes_pkg = importlib.import_module(pack.__name__ + ".nodes")
    return sorted(cls.GET_SCHEMA().node_id for cls in nodes_pkg.NODES)


def test_pack_imports_without_errors(comfy):
    assert comfy.pack_module_name() in sys.modules, "ComfyUI did not import the pack"
    pack_errors = [m for m in comfy.boot_messages() if PACK_DIR_NAME in m or "comfyui_dojo" in m.lower()]
    assert pack_errors == []


def test_every_dojo_node_is_registered(comfy):
    expected = expected_node_ids(comfy)
    assert expected, "the pack declares no nodes"
    assert comfy.dojo_node_ids() == expected


def test_dojo_node_schemas_follow_the_house_style(comfy):
    for node_id in comfy.dojo_node_ids():
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        info = cls.GET_NODE_INFO_V1()
        assert node_id.startswith("Dojo"), node_id
        assert info["category"].startswith("Dojo/"), (node_id, info["category"])
        assert info["display_name"].startswith("Dojo "), (node_id, info["display_name"])
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_comfyui_server_lists_dojo_nodes(comfy, tmp_path):
    """The real server process (main.py) starts with the pack and serves its schemas on /object_info."""
    base = make_base_directory(tmp_path / "server_base")
    with comfyui_server(base, tmp_path / "server.log", "/object_info") as (server, info):
        for node_id in expected_node_ids(comfy):
            assert node_id in info, f"{node_id} missing from /object_info"
            assert info[node_id]["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
        assert "IMPORT FAILED" not in "\n".join(l for l in server.log().splitlines() if PACK_DIR_NAME in l)
