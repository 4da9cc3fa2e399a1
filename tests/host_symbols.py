"""The host symbols the pack uses, read from its source (``nodes/``, ``trainer/``, the root
``__init__.py``), and the names an older ComfyUI tree has, read from that tree's source.

A use is ``from comfy.x import Name``, or an attribute chain on an imported host module
(``comfy.model_base.Flux``, ``mb.SDXL`` after ``import comfy.model_base as mb``, ``io.Combo`` after
``from comfy_api.latest import io``). ``getattr(module, "Name", default)`` is the guarded form and
is not a use: a missing name there means "this host has no such thing".

``python tests/host_symbols.py TREE > tests/host_names_oldest.json`` writes the names of TREE's
modules that the pack uses (top-level names of each module file; names only, no host code).
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_ROOTS = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "comfy_execution")
PACK_SOURCES = ("nodes", "trainer")


def pack_files() -> list[Path]:
    return [REPO / "__init__.py"] + sorted(p for d in PACK_SOURCES for p in (REPO / d).rglob("*.py"))


def _is_host(module: str) -> bool:
    return module.split(".")[0] in HOST_ROOTS


def _chain(node) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"] (None if the chain does not start at a plain name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def uses(path: Path) -> set[tuple[str, str]]:
    """(module, name) pairs the file uses unguarded, e.g. ("comfy.model_base", "Flux")."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    modules: set[str] = set()      # host modules imported as modules
    aliases: dict[str, str] = {}   # local name -> the host module (or module member) it stands for
    out: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_host(a.name):
                    parts = a.name.split(".")
                    modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
                    aliases[a.asname] = a.name if a.asname else None
                    if not a.asname:
                        aliases[parts[0]] = parts[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_host(node.module):
            for a in node.names:
                out.add((node.module, a.name))
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                modules.add(f"{node.module}.{a.name}")  # (a chain on it names its members)
    aliases.pop(None, None)
    for node in ast.walk(tree):
        if (not isinstance(node, ast.Attribute) or isinstance(node.parent, ast.Attribute)
                or isinstance(node.ctx, ast.Store)):  # (the pack setting a name on a host module is no use)
            continue
        chain = _chain(node)
        if not chain or chain[0] not in aliases or aliases[chain[0]] is None:
            continue
        prefix, rest = aliases[chain[0]], chain[1:]
        while rest and f"{prefix}.{rest[0]}" in modules:
            prefix, rest = f"{prefix}.{rest[0]}", rest[1:]
        if rest:
            out.add((prefix, rest[0]))
    return out


def pack_uses() -> dict[str, set[str]]:
    """{host module: names the pack uses in it} (attribute chains are split at every level)."""
    found: dict[str, set[str]] = {}
    for path in pack_files():
        for module, name in uses(path):
            found.setdefault(module, set()).add(name)
    return found


#: Names that are not module files of their own: V3's ``io`` is ``comfy_api/latest/_io.py`` (0.3.75:
#: its top-level names; 0.3.52: the class ``_IO`` in it, whose body lists them).
MODULE_FILES = {"comfy_api.latest.io": "comfy_api.latest._io"}
NAMESPACE_CLASSES = {"comfy_api.latest._io": "_IO"}


def _top_level(body):
    """The statements of a module body, those inside top-level ``if``/``else`` and ``try`` blocks too
    (``if args.models_directory: models_dir = ... else: models_dir = ...`` defines a module name)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody
                                  + [s for h in node.handlers for s in h.body])


def tree_names(tree: Path, module: str) -> set[str] | None:
    """Top-level names of ``module`` in the ComfyUI ``tree`` (None if it is not a file there)."""
    module = MODULE_FILES.get(module, module)
    base = tree.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            t = ast.parse(candidate.read_text(errors="replace"))
            names = set()
            for node in _top_level(t.body):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names |= {n.id for tgt in node.targets for n in ast.walk(tgt) if isinstance(n, ast.Name)}
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
                elif isinstance(node, ast.ImportFrom):
                    names |= {a.asname or a.name for a in node.names}
                elif isinstance(node, ast.Import):
                    names |= {(a.asname or a.name).split(".")[0] for a in node.names}
                if isinstance(node, ast.ClassDef) and node.name == NAMESPACE_CLASSES.get(module):
                    names |= {n.id for sub in node.body if isinstance(sub, ast.Assign)
                              for tgt in sub.targets for n in ast.walk(tgt) if isinstance(n, ast.Name)}
                    names |= {sub.name for sub in node.body if isinstance(sub, ast.ClassDef)}
            # sub-modules and sub-packages count as names of a package
            if candidate.name == "__init__.py":
                names |= {p.stem for p in base.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
            return names
    if base.is_dir():  # a namespace package (no __init__.py): its sub-modules
        return {p.stem for p in base.iterdir() if p.suffix == ".py" or p.is_dir()}
    return None


def host_modules(tree: Path) -> dict[str, list[str]]:
    """{module: sorted names} of ``tree`` for every host module (and package level) the pack uses."""
    wanted = set()
    for module in pack_uses():
        parts = module.split(".")
        wanted |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    out = {}
    for module in sorted(wanted):
        names = tree_names(tree, module)
        if names is not None:
            out[module] = sorted(names)
    return out


def tree_version(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text()
    return text.split("__version__")[1].split('"')[1]


if __name__ == "__main__":
    tree = Path(sys.argv[1])
    print(json.dumps({"comfyui_version": tree_version(tree), "modules": host_modules(tree)}, indent=0, sort_keys=True))
