"""Every host symbol the pack uses unguarded exists in the oldest supported ComfyUI (0.3.52), so a
newer class missing there cannot crash a user's older host (as Flux2 did in TDD LoRA Loader).

``tests/host_names_oldest.json`` holds the names of the host modules the pack uses, read from the
0.3.52 tree (``python tests/host_symbols.py .host/ComfyUI-0.3.52``). A new unguarded use of a name
that tree lacks fails here: look it up with ``getattr(module, "Name", None)`` and treat None as
"this host has no such thing".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness
import host_symbols

NAMES = json.loads((Path(__file__).parent / "host_names_oldest.json").read_text())
OLDEST_TREE = harness.REPO / ".host" / f"ComfyUI-{NAMES['comfyui_version']}"


def missing_in(names: dict) -> list[str]:
    return sorted(f"{module}.{name}" for module, used in host_symbols.pack_uses().items() for name in used
                  if name not in set(names.get(module, ())))


def test_the_pack_uses_only_names_the_oldest_supported_host_has():
    assert missing_in(NAMES["modules"]) == []


def test_the_pinned_host_has_them_too():
    assert missing_in(host_symbols.host_modules(harness.comfyui_path())) == []


def test_the_walk_sees_a_new_unguarded_use(tmp_path, monkeypatch):
    """The check fails on an unguarded newer class and passes on the getattr form."""
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("import comfy.model_base\nlater = (comfy.model_base.Flux2, comfy.model_base.Chroma)\n")
    good.write_text("import comfy.model_base\nlater = getattr(comfy.model_base, 'Flux2', None)\n")
    monkeypatch.setattr(host_symbols, "pack_files", lambda: [bad])
    assert missing_in(NAMES["modules"]) == ["comfy.model_base.Flux2"]
    monkeypatch.setattr(host_symbols, "pack_files", lambda: [good])
    assert missing_in(NAMES["modules"]) == []


def test_the_names_file_matches_the_oldest_tree():
    if not (OLDEST_TREE / "main.py").is_file():
        pytest.skip(f"{OLDEST_TREE} not unpacked (scripts/bootstrap.sh does it unless TDD_NO_OLD_HOST=1)")
    assert host_symbols.tree_version(OLDEST_TREE) == NAMES["comfyui_version"]
    assert host_symbols.host_modules(OLDEST_TREE) == NAMES["modules"]
