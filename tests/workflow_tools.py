"""ComfyUI UI-format workflows (what the frontend's "Save" writes, ``version`` 0.4): validation
against a server's ``/object_info`` and conversion to the API format that ``POST /prompt`` takes.

UI format, in short::

    {"last_node_id": N, "last_link_id": L,
     "nodes": [{"id", "type", "pos", "size", "flags", "order", "mode",
                "inputs":  [{"name", "type", "link", "widget"?: {"name"}}],    # sockets (+ converted widgets)
                "outputs": [{"name", "type", "links": [...], "slot_index"}],
                "properties": {"Node name for S&R": type}, "widgets_values": [...]}],
     "links": [[id, from_node, from_slot, to_node, to_slot, type]],
     "groups": [], "config": {}, "extra": {}, "version": 0.4}

``widgets_values`` lists the values of the node's widget inputs (INT, FLOAT, STRING, BOOLEAN and
combos, unless ``forceInput``) in ``/object_info`` input order (required, then optional), with the
extra values the frontend stores for its own helper widgets: ``control_after_generate`` ("fixed",
"increment", "decrement", "randomize") after an input that has that option (seed, noise_seed), and
the upload button's value ("image") after a combo with ``image_upload`` (LoadImage).

``/object_info`` spells a combo two ways: V1 nodes ``[["a", "b"], {...}]``, V3 nodes
``["COMBO", {"options": ["a", "b"], ...}]``; both are handled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# Node types that exist only in the frontend (never sent to the server).
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_FLAGS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")

MODEL_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Combos whose options are the user's files: the workflow names a file the user downloads, so the
# value only has to look like such a file name.
_MODEL_FILE_INPUT = re.compile(
    r"^(ckpt|lora|unet|clip|clip_vision|vae|control_net|style_model|gligen|upscale_model|model|hypernetwork)"
    r"_name\d*$")
_IMAGE_FILE_INPUTS = frozenset({"image"})


def file_input_exts(input_name: str):
    """Accepted extensions if ``input_name`` is a combo of user files, else None."""
    if _MODEL_FILE_INPUT.match(input_name):
        return MODEL_EXTS
    if input_name in _IMAGE_FILE_INPUTS:
        return IMAGE_EXTS
    return None


def load(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# /object_info input specs
# ------------------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    name: str
    type: str                 # "COMBO" for combos
    opts: dict
    options: list | None      # combo options
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput", False)


@dataclass
class WidgetSlot:
    name: str                 # input name; for helpers "<input>:control_after_generate" / ":upload"
    kind: str                 # "value" | "control" | "upload"
    spec: InputSpec


def parse_spec(name: str, spec, optional: bool) -> InputSpec:
    if isinstance(spec, str):
        spec = [spec]
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(t, list):
        return InputSpec(name, "COMBO", opts, list(t), optional)
    if t == "COMBO":
        return InputSpec(name, "COMBO", opts, list(opts.get("options", [])), optional)
    return InputSpec(name, t, opts, None, optional)


def input_specs(info: dict) -> list[InputSpec]:
    """Required and optional inputs of one ``/object_info`` entry, in the frontend's order."""
    inp = info.get("input", {})
    order = info.get("input_order") or {}
    out = []
    for cat in ("required", "optional"):
        section = inp.get(cat) or {}
        names = order.get(cat) or list(section)
        for n in names:
            if n in section:
                out.append(parse_spec(n, section[n], cat == "optional"))
    return out


def widget_slots(info: dict) -> list[WidgetSlot]:
    slots = []
    for spec in input_specs(info):
        if not spec.is_widget:
            continue
        slots.append(WidgetSlot(spec.name, "value", spec))
        if spec.opts.get("control_after_generate"):
            slots.append(WidgetSlot(spec.name + ":control_after_generate", "control", spec))
        if spec.type == "COMBO" and any(spec.opts.get(f) for f in UPLOAD_FLAGS):
            slots.append(WidgetSlot(spec.name + ":upload", "upload", spec))
    return slots


def widget_values(node: dict, info: dict) -> dict:
    """{input name: value} of a node's widget inputs (helper widgets left out)."""
    vals = node.get("widgets_values") or []
    if isinstance(vals, dict):
        return {s.name: vals[s.name] for s in widget_slots(info) if s.kind == "value" and s.name in vals}
    return {s.name: v for s, v in zip(widget_slots(info), vals) if s.kind == "value"}


def missing_user_files(wf: dict, object_info: dict) -> list[str]:
    """``"<id> <type>"`` of each node that names a user file (a model, an input image) the server does
    not have: the nodes the frontend marks as having errors until the user supplies the file."""
    missing = []
    for n in wf.get("nodes", []):
        info = object_info.get(n.get("type"))
        if info is None:
            continue
        values = widget_values(n, info)
        if any(file_input_exts(spec.name) is not None and spec.name in values and values[spec.name] not in spec.options
               for spec in input_specs(info) if spec.type == "COMBO"):
            missing.append(f"{n['id']} {n['type']}")
    return missing


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    return bool(set(str(out_type).split(",")) & set(str(in_type).split(",")))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_widget(node_label: str, slot: WidgetSlot, value) -> list[str]:
    spec, where = slot.spec, f"{node_label} widget {slot.name!r}"
    if slot.kind == "control":
        return [] if value in CONTROL_VALUES else [f"{where}: {value!r} is not one of {CONTROL_VALUES}"]
    if slot.kind == "upload":
        return [] if isinstance(value, str) else [f"{where}: upload widget value {value!r} is not a string"]
    t = spec.type
    if t == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if t == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    if t in ("INT", "FLOAT"):
        if not _is_num(value) or (t == "INT" and not float(value).is_integer()):
            return [f"{where}: {value!r} is not {'an integer' if t == 'INT' else 'a number'}"]
        lo, hi = spec.opts.get("min"), spec.opts.get("max")
        if lo is not None and value < lo:
            return [f"{where}: {value!r} is below min {lo}"]
        if hi is not None and value > hi:
            return [f"{where}: {value!r} is above max {hi}"]
        return []
    if t == "COMBO":
        exts = file_input_exts(spec.name)
        if exts is not None:
            if not isinstance(value, str) or not value.strip():
                return [f"{where}: file name {value!r} is not a non-empty string"]
            if not value.lower().endswith(exts):
                return [f"{where}: file name {value!r} does not end with one of {exts}"]
            return []
        if value not in spec.options:
            shown = spec.options if len(spec.options) <= 20 else f"{len(spec.options)} options"
            return [f"{where}: {value!r} not in combo options {shown}"]
        return []
    return []


def validate_workflow(wf: dict, object_info: dict) -> list[str]:
    """Every problem found in a UI-format workflow, as readable strings (empty = valid)."""
    errors: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        if key not in wf:
            errors.append(f"workflow: missing top-level key {key!r}")
    nodes = wf.get("nodes") or []
    links = wf.get("links") or []

    by_id: dict = {}
    for n in nodes:
        if n.get("id") in by_id:
            errors.append(f"node id {n.get('id')} is used twice")
        by_id[n.get("id")] = n
    if nodes and isinstance(wf.get("last_node_id"), int) and wf["last_node_id"] < max(by_id):
        errors.append(f"last_node_id {wf['last_node_id']} < largest node id {max(by_id)}")

    link_by_id: dict = {}
    for lk in links:
        if not (isinstance(lk, list) and len(lk) == 6):
            errors.append(f"link {lk!r}: not [id, from_node, from_slot, to_node, to_slot, type]")
            continue
        if lk[0] in link_by_id:
            errors.append(f"link id {lk[0]} is used twice")
        link_by_id[lk[0]] = lk
    if link_by_id and isinstance(wf.get("last_link_id"), int) and wf["last_link_id"] < max(link_by_id):
        errors.append(f"last_link_id {wf['last_link_id']} < largest link id {max(link_by_id)}")

    # -- nodes: type exists, declared sockets agree with /object_info, widget values valid -------
    infos: dict = {}
    for n in nodes:
        label = f"node {n.get('id')} ({n.get('type')})"
        for key in ("id", "type", "pos", "size"):
            if key not in n:
                errors.append(f"{label}: missing key {key!r}")
        t = n.get("type")
        if t in FRONTEND_ONLY:
            continue
        info = object_info.get(t)
        if info is None:
            errors.append(f"{label}: unknown node type {t!r} (not in the server's /object_info)")
            continue
        infos[n["id"]] = info
        specs = {s.name: s for s in input_specs(info)}
        linked = set()
        for slot in n.get("inputs") or []:
            s = specs.get(slot.get("name"))
            if s is None:
                errors.append(f"{label}: input {slot.get('name')!r} does not exist on {t}")
                continue
            if not types_match(slot.get("type", "*"), s.type):
                errors.append(f"{label}: input {s.name!r} declared as {slot.get('type')!r}, server says {s.type!r}")
            if slot.get("link") is not None:
                linked.add(s.name)
        for s in specs.values():
            if not s.is_widget and not s.optional and s.name not in linked:
                errors.append(f"{label}: required input {s.name!r} ({s.type}) is not connected")
        out_types = info.get("output") or []
        for i, o in enumerate(n.get("outputs") or []):
            if i >= len(out_types):
                errors.append(f"{label}: output slot {i} ({o.get('name')!r}) does not exist on {t}")
            elif o.get("type") != out_types[i]:
                errors.append(f"{label}: output {i} declared as {o.get('type')!r}, server says {out_types[i]!r}")
        slots = widget_slots(info)
        vals = n.get("widgets_values")
        if vals is None:
            vals = []
        if isinstance(vals, dict):
            pairs = [(s, vals[s.name]) for s in slots if s.kind == "value" and s.name in vals]
            missing = [s.name for s in slots if s.kind == "value" and not s.spec.optional and s.name not in vals]
        else:
            if len(vals) > len(slots):
                errors.append(f"{label}: {len(vals)} widgets_values for {len(slots)} widgets "
                              f"{[s.name for s in slots]}")
            pairs = list(zip(slots, vals))
            missing = [s.name for s in slots[len(vals):] if not s.spec.optional]
        for name in missing:
            errors.append(f"{label}: no value for widget {name!r}")
        for s, v in pairs:
            errors += check_widget(label, s, v)

    # -- links: both ends exist, agree with the node slots, and join matching types --------------
    for lid, (_, a, a_slot, b, b_slot, ltype) in link_by_id.items():
        where = f"link {lid} ({a}:{a_slot} -> {b}:{b_slot} {ltype})"
        na, nb = by_id.get(a), by_id.get(b)
        if na is None or nb is None:
            errors.append(f"{where}: node {a if na is None else b} does not exist")
            continue
        outs, ins = na.get("outputs") or [], nb.get("inputs") or []
        if not (0 <= a_slot < len(outs)):
            errors.append(f"{where}: node {a} has no output slot {a_slot}")
            continue
        if not (0 <= b_slot < len(ins)):
            errors.append(f"{where}: node {b} has no input slot {b_slot}")
            continue
        out, inp = outs[a_slot], ins[b_slot]
        if lid not in (out.get("links") or []):
            errors.append(f"{where}: not listed in node {a} output {a_slot} links {out.get('links')}")
        if inp.get("link") != lid:
            errors.append(f"{where}: node {b} input {inp.get('name')!r} has link {inp.get('link')}")
        out_t = out.get("type", "*")
        if a in infos and 0 <= a_slot < len(infos[a].get("output") or []):
            out_t = infos[a]["output"][a_slot]
        in_t = inp.get("type", "*")
        if b in infos:
            s = {x.name: x for x in input_specs(infos[b])}.get(inp.get("name"))
            in_t = s.type if s is not None else in_t
        if not types_match(out_t, in_t):
            errors.append(f"{where}: type mismatch: {na.get('type')} output {a_slot} is {out_t!r}, "
                          f"{nb.get('type')} input {inp.get('name')!r} is {in_t!r}")
        elif not types_match(ltype, out_t) or not types_match(ltype, in_t):
            errors.append(f"{where}: link type {ltype!r} does not match {out_t!r} -> {in_t!r}")

    for n in nodes:
        label = f"node {n.get('id')} ({n.get('type')})"
        for i, inp in enumerate(n.get("inputs") or []):
            lid = inp.get("link")
            if lid is None:
                continue
            lk = link_by_id.get(lid)
            if lk is None:
                errors.append(f"{label}: input {inp.get('name')!r} refers to missing link {lid}")
            elif (lk[3], lk[4]) != (n.get("id"), i):
                errors.append(f"{label}: input {i} has link {lid}, which ends at {lk[3]}:{lk[4]}")
        for i, out in enumerate(n.get("outputs") or []):
            for lid in out.get("links") or []:
                lk = link_by_id.get(lid)
                if lk is None:
                    errors.append(f"{label}: output {i} lists missing link {lid}")
                elif (lk[1], lk[2]) != (n.get("id"), i):
                    errors.append(f"{label}: output {i} lists link {lid}, which starts at {lk[1]}:{lk[2]}")
    return errors


def overlapping_nodes(wf: dict, title_h: float = 30.0) -> list[tuple]:
    """Pairs of node ids whose boxes (pos, size, plus the title bar above pos) overlap."""
    boxes = []
    for n in wf.get("nodes", []):
        (x, y), (w, h) = n["pos"], n["size"]
        boxes.append((n["id"], x, y - title_h, x + w, y + h))
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]:
                out.append((a[0], b[0]))
    return out


# ------------------------------------------------------------------------------------------------
# Queries and conversion
# ------------------------------------------------------------------------------------------------

def nodes_of_type(wf: dict, node_type: str) -> list[dict]:
    return [n for n in wf.get("nodes", []) if n.get("type") == node_type]


def node_widgets(wf: dict, object_info: dict, node_type: str) -> list[dict]:
    """{input: value} for every node of ``node_type``."""
    return [widget_values(n, object_info[node_type]) for n in nodes_of_type(wf, node_type)]


def to_api(wf: dict, object_info: dict) -> dict:
    """The API-format prompt (``{"<id>": {"class_type", "inputs", "_meta"}}``) of a UI workflow.
    Notes are dropped, muted (mode 2) and bypassed (mode 4) nodes are left out, Reroutes are
    followed and PrimitiveNodes become literal values."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    link_by_id = {lk[0]: lk for lk in wf["links"]}

    def source(lid):
        lk = link_by_id[lid]
        a, slot = lk[1], lk[2]
        n = by_id[a]
        if n["type"] == "Reroute":
            up = (n.get("inputs") or [{}])[0].get("link")
            return source(up) if up is not None else None
        if n["type"] == "PrimitiveNode":
            return ("value", (n.get("widgets_values") or [None])[0])
        return ("link", [str(a), slot])

    api = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        info = object_info[n["type"]]
        inputs = dict(widget_values(n, info))
        for inp in n.get("inputs") or []:
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                continue
            inputs[inp["name"]] = src[1]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                             "_meta": {"title": n.get("title") or info.get("display_name") or n["type"]}}
    return api
