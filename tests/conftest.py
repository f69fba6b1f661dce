"""Tests import the pack from this checkout (see pack_import.py). Every session ends with one line
naming its tier (engine, or integration with the ComfyUI tree and the version the tree reports) and its
counts; with $DOJO_TIER_REPORT set, the same goes to that file as JSON (dojo.sh's summary reads it)."""
import json
import os
import re
from pathlib import Path

import pack_import  # noqa: F401


def comfyui_tree() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()


def comfyui_tree_version(tree: Path) -> str | None:
    """The version a ComfyUI tree reports in its comfyui_version.py (read, not imported)."""
    try:
        found = re.search(r'^__version__\s*=\s*"([^"]+)"', (tree / "comfyui_version.py").read_text(), re.M)
    except OSError:
        return None
    return found.group(1) if found else None


def pytest_collection_modifyitems(config, items):
    config._dojo_integration = any("integration" in item.nodeid.split("::")[0] for item in items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = terminalreporter.stats
    counts = {"passed": len(stats.get("passed", [])), "failed": len(stats.get("failed", [])),
              "skipped": len(stats.get("skipped", [])), "errors": len(stats.get("error", []))}
    report = {"tier": "engine", "tree": None, "version": None, **counts, "exitstatus": int(exitstatus)}
    if getattr(config, "_dojo_integration", False):
        tree = comfyui_tree()
        report.update(tier="integration", tree=str(tree), version=comfyui_tree_version(tree))
    where = (f" against ComfyUI {report['version'] or '(no tree)'} at {report['tree']}"
             if report["tier"] == "integration" else "")
    terminalreporter.write_line(
        f"tier summary: {report['tier']}{where}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['errors']} errors")
    if os.environ.get("DOJO_TIER_REPORT"):
        Path(os.environ["DOJO_TIER_REPORT"]).write_text(json.dumps(report))
