"""Bad values refused, naming only the input that is wrong, over HTTP.

Every widget input of every TDD node gets its bad values here, taken from the server's own
/object_info (so a new input is covered the day it appears); every link input gets a link of the
wrong type. Each is refused before the prompt runs, each error naming that one input: the host's
min/max check, the nodes' combo checks, and for NaN and infinite floats (which the host would let
through) the pack's prompt handler. The guidance interval's two ends are checked together: an
error there names both. A refused prompt never reaches the history (whose JSON the browser could
not read with a NaN in it). The server keeps serving.
"""
from __future__ import annotations

import json
import math
import urllib.request

import pytest

import harness

from test_server_tdd import TDD_NODES, image_of, tdd_graph

DEMO_GRAPH = {"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights": "shipped (demo/weights)"}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
NODE_IN_GRAPH = {"TDDLoraLoader": "2", "TDDX0Clip": "3", "TDDGuidance": "6", "TDDScheduler": "7", "TDDSampler": "8",
                 "TDDDemoCheckpointLoader": "1"}
WRONG_LINK = ["10", 0]  # EmptyLatentImage's LATENT: no TDD node takes one
NODES = sorted(NODE_IN_GRAPH)


def graph_for(node: str) -> dict:
    return {k: {**v, "inputs": dict(v["inputs"])} for k, v in DEMO_GRAPH.items()} if node == "TDDDemoCheckpointLoader" \
        else tdd_graph()


def bad_values(spec) -> list:
    """Values a widget must refuse, from its /object_info entry ([type, options])."""
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    if kind == "FLOAT":
        return [math.nan, math.inf, -math.inf, opts["max"] + 1.0, opts["min"] - 1.0]
    if kind == "INT":
        return [opts["max"] + 1, opts["min"] - 1]
    if kind == "COMBO" or isinstance(kind, list):
        return ["no such choice"]
    return []


def cases(info: dict) -> list[tuple]:
    out = []
    for node in NODES:
        spec = info[node]["input"]
        for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if entry[0] == "BOOLEAN":  # the host turns any value into a bool
                continue
            values = bad_values(entry) if entry[0] in ("FLOAT", "INT", "COMBO") else [WRONG_LINK]
            out += [(node, name, value) for value in values]
    return out


@pytest.fixture(scope="module")
def info(server):
    return server.object_info()


def test_every_tdd_node_input_is_covered(info):
    """Every input of every TDD node but the booleans has a bad-value case below."""
    covered = {(node, name) for node, name, _ in cases(info)}
    for node in NODES:
        spec = info[node]["input"]
        for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            assert entry[0] == "BOOLEAN" or (node, name) in covered, (node, name)
    assert set(TDD_NODES) <= set(NODES)


GUIDANCE_INTERVAL = {"guidance_start", "guidance_end"}


def refused_inputs(payload, node_id: str) -> tuple[set, str]:
    errors = payload["node_errors"][node_id]["errors"]
    return ({e["extra_info"]["input_name"] for e in errors},
            " | ".join(f"{e['type']}: {e['message']}: {e['details']}" for e in errors))


def test_bad_values_are_refused_naming_only_the_wrong_input(server, info):
    before = len(server.history())
    for node, name, value in cases(info):
        graph = graph_for(node)
        node_id = NODE_IN_GRAPH[node]
        graph[node_id]["inputs"][name] = value
        status, payload = server.queue(graph)
        non_finite = isinstance(value, float) and not math.isfinite(value)
        if status == 400:
            named, text = refused_inputs(payload, node_id)
            expected = GUIDANCE_INTERVAL if node == "TDDGuidance" and name in GUIDANCE_INTERVAL else {name}
            assert named == expected, f"{node}.{name} = {value!r}: errors name {named}: {text}"
            if value is WRONG_LINK:
                assert "return_type_mismatch" in text, text
                continue
            kind, opts = info[node]["input"].get("required", {}).get(name) or info[node]["input"]["optional"][name]
            if kind == "COMBO":  # ... and what is allowed
                assert f"{name} = " in text and "allowed: " in text and repr(opts["options"][0]) in text, text
            elif non_finite:
                assert "not a finite number" in text, text
            else:
                assert ("min of" in text or "max of" in text or f"{opts['min']} to {opts['max']}" in text), text
            continue
        raise AssertionError(f"{node}.{name} = {value!r} was accepted: {payload}")
    assert len(server.history()) == before, "a refused prompt ran"
    # the history stays valid JSON for the browser (no NaN / Infinity in it)
    raw = urllib.request.urlopen(server.url + "/history", timeout=30).read().decode()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"/history holds {c}"))
    assert image_of(server, server.run(tdd_graph(seed=7))).std() > 0  # the server keeps serving


def test_guidance_interval_upside_down_is_refused(server):
    graph = tdd_graph()
    graph["6"]["inputs"].update(guidance_start=0.8, guidance_end=0.2)
    status, payload = server.queue(graph)
    assert status == 400 and "guidance_start <= guidance_end" in str(payload["node_errors"]["6"]), payload


def test_valid_values_still_pass(server):
    """The checks refuse nothing valid: the interval's ends, a quantile clip and eta 0 run."""
    graph = tdd_graph(eta=0.0)
    graph["3"]["inputs"].update(mode="quantile", ratio=1.0, max_value=20.0)
    graph["6"]["inputs"].update(guidance_start=0.0, guidance_end=1.0, scale=0.0)
    assert image_of(server, server.run(graph)).std() > 0
