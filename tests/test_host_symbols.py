"""Every host symbol the pack uses unguarded exists in the oldest supported ComfyUI (0.3.52) and in
the current release (0.33.0), so a newer class missing in the old host, or a name the new host removed
or renamed, cannot crash a user's host (as Flux2 did in TDD LoRA Loader on 0.3.52).

``tests/host_names_oldest.json`` and ``tests/host_names_current.json`` hold the names of the host
modules the pack uses, read from those trees (``python tests/host_symbols.py .host/ComfyUI-0.3.52``,
``... .host/ComfyUI``), so the check needs neither tree. A new unguarded use of a name one of them
lacks fails here: look it up with ``getattr(module, "Name", None)`` and treat None as "this host has
no such thing".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness
import host_symbols

NAMES = json.loads((Path(__file__).parent / "host_names_oldest.json").read_text())
CURRENT = json.loads((Path(__file__).parent / "host_names_current.json").read_text())
OLDEST_TREE = harness.REPO / ".host" / f"ComfyUI-{NAMES['comfyui_version']}"
HOSTS = {"oldest": NAMES, "current": CURRENT}


def missing_in(names: dict) -> list[str]:
    return sorted(f"{module}.{name}" for module, used in host_symbols.pack_uses().items() for name in used
                  if name not in set(names.get(module, ())))


@pytest.mark.parametrize("host", HOSTS)
def test_the_pack_uses_only_names_the_supported_hosts_have(host):
    assert missing_in(HOSTS[host]["modules"]) == []


def test_the_test_host_has_them_too():
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


def test_the_walk_sees_a_name_the_current_host_removed(tmp_path, monkeypatch):
    """comfy.utils.ALWAYS_SAFE_LOAD is in 0.3.52 and gone in 0.33.0: its use fails on the current host."""
    old = tmp_path / "old.py"
    old.write_text("import comfy.utils\nsafe = comfy.utils.ALWAYS_SAFE_LOAD\n")
    monkeypatch.setattr(host_symbols, "pack_files", lambda: [old])
    assert missing_in(NAMES["modules"]) == []
    assert missing_in(CURRENT["modules"]) == ["comfy.utils.ALWAYS_SAFE_LOAD"]


def test_module_names_inside_top_level_blocks_are_read(tmp_path):
    """A name a module defines in a top-level if/else or try (folder_paths.models_dir) is one of its names."""
    (tmp_path / "mod.py").write_text("import os\nif os.sep:\n    a = 1\nelse:\n    b = 2\ntry:\n    c = 3\n"
                                     "except ImportError:\n    d = 4\n")
    assert {"a", "b", "c", "d", "os"} <= host_symbols.tree_names(tmp_path, "mod")


@pytest.mark.parametrize("host", HOSTS)
def test_the_names_file_matches_its_tree(host):
    names = HOSTS[host]
    tree = OLDEST_TREE if host == "oldest" else harness.REPO / ".host" / "ComfyUI"
    if not (tree / "main.py").is_file() or host_symbols.tree_version(tree) != names["comfyui_version"]:
        pytest.skip(f"no ComfyUI {names['comfyui_version']} at {tree} (scripts/bootstrap.sh unpacks it)")
    assert host_symbols.host_modules(tree) == names["modules"]
