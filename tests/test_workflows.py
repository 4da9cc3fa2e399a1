"""The example workflows in ``workflows/`` (UI format; ComfyUI serves the folder as this pack's
workflow templates) are checked against the real server's ``/object_info``: node types exist,
widget values are valid, links join matching types and are consistent, and the recommended TDD
settings are what the README states.  Every ``workflows/*.json`` is picked up."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

import harness
import workflow_tools as wt

WORKFLOW_DIR = harness.REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
IDS = [p.stem for p in WORKFLOWS]

# Expected settings per file: {node type: [{widget: value}, ...]} (each listed dict must match a
# node of that type), plus node types that must be present.
EXPECTED = {
    "tdd_demo": {
        "TDDDemoCheckpointLoader": {"weights": "shipped (demo/weights)"},
        "TDDLoraLoader": {"lora_name": "demo_tdd_lora.safetensors", "strength_model": 1.0},
        "TDDScheduler": {"steps": 4, "denoise": 1.0},
        "TDDSampler": {"eta": 0.2},
        "TDDGuidance": {"scale": 1.7},
        "KSampler": {"steps": 25, "cfg": 4.5, "sampler_name": "euler"},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "CLIPTextEncode": {"text": ""},
    },
    "sdxl_tdd_txt2img": {
        "TDDLoraLoader": {"lora_name": "sdxl_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "TDDScheduler": {"steps": 4, "denoise": 1.0},
        "TDDSampler": {"eta": 0.2},
        "TDDGuidance": {"scale": 1.7},
        "EmptyLatentImage": {"width": 1024, "height": 1024},
        "CLIPTextEncode": {"text": ""},
        "CheckpointLoaderSimple": {},
        "RandomNoise": {},
        "SamplerCustomAdvanced": {},
        "VAEDecode": {},
        "SaveImage": {},
    },
    "sdxl_tdd_img2img": {
        "TDDLoraLoader": {"lora_name": "sdxl_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "TDDScheduler": {"steps": 4, "denoise": 0.6},
        "TDDSampler": {"eta": 0.2},
        "TDDGuidance": {"scale": 1.7},
        "LoadImage": {},
        "VAEEncode": {},
        "SamplerCustomAdvanced": {},
        "SaveImage": {},
    },
    "sdxl_tdd_controlnet": {
        "TDDLoraLoader": {"lora_name": "sdxl_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "TDDScheduler": {"steps": 4},
        "TDDSampler": {"eta": 0.2},
        "TDDGuidance": {"scale": 1.7},
        "ControlNetLoader": {},
        "ControlNetApplyAdvanced": {},
        "Canny": {},
        "LoadImage": {},
        "SamplerCustomAdvanced": {},
    },
    "ksampler_tdd": {
        "TDDLoraLoader": {"lora_name": "sdxl_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "KSampler": {"sampler_name": "tdd", "scheduler": "tdd", "steps": 4, "cfg": 1.7, "denoise": 1.0},
        "CheckpointLoaderSimple": {},
        "SaveImage": {},
    },
    "flux_tdd": {
        "UNETLoader": {},
        "DualCLIPLoader": {"type": "flux"},
        "VAELoader": {},
        "TDDLoraLoader": {"lora_name": "FLUX.1-dev_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "FluxGuidance": {"guidance": 2.0},
        "TDDScheduler": {"steps": 8, "denoise": 1.0},
        "TDDSampler": {"eta": 0.2},
        "EmptySD3LatentImage": {},
        "SamplerCustomAdvanced": {},
    },
    "svd_tdd_img2vid": {
        "ImageOnlyCheckpointLoader": {},
        "TDDLoraLoader": {"lora_name": "svd-xt-1-1_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "VideoLinearCFGGuidance": {"min_cfg": 1.0},
        "SVD_img2vid_Conditioning": {},
        "TDDScheduler": {"steps": 4, "denoise": 1.0},
        "TDDSampler": {"eta": 0.3},
        "SamplerCustom": {},
        "SaveAnimatedWEBP": {},
    },
    "sdxl_tdd_bake_checkpoint": {
        "CheckpointLoaderSimple": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
        "TDDLoraLoader": {"lora_name": "sdxl_tdd_lora_weights.safetensors", "strength_model": 1.0},
        "CheckpointSave": {"filename_prefix": "checkpoints/sdxl_tdd_baked"},
    },
}


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def _load(name: str) -> dict:
    return wt.load(WORKFLOW_DIR / f"{name}.json")


def test_workflow_files_present():
    assert {p.stem for p in WORKFLOWS} >= set(EXPECTED), "an expected example workflow is missing"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_valid(path: Path, object_info):
    wf = wt.load(path)
    errors = wt.validate_workflow(wf, object_info)
    assert not errors, f"{path.name}:\n  " + "\n  ".join(errors)
    assert wf.get("version") == 0.4
    assert wt.overlapping_nodes(wf) == [], f"{path.name}: overlapping node boxes"
    # Every example explains its settings in a note, and uses this pack.
    notes = [n for n in wf["nodes"] if n["type"] in wt.NOTE_TYPES]
    assert notes and all(isinstance(v, str) and v.strip() for n in notes for v in n["widgets_values"]), \
        f"{path.name}: needs a non-empty Note/MarkdownNote"
    assert any(n["type"].startswith("TDD") for n in wf["nodes"]), f"{path.name}: uses no TDD node"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recommended_settings(name: str, object_info):
    wf = _load(name)
    for node_type, want in EXPECTED[name].items():
        have = wt.node_widgets(wf, object_info, node_type)
        assert have, f"{name}: no {node_type} node"
        assert any(all(h.get(k) == v for k, v in want.items()) for h in have), \
            f"{name}: no {node_type} with {want}; found {have}"


def test_flux_settings_come_from_the_lora(object_info):
    """FLUX: the TDD LoRA Loader's steps / eta / guidance outputs (slots 3-5, after MODEL, CLIP, info)
    drive TDD Scheduler steps, TDD Sampler eta and FluxGuidance guidance; the widget values stay."""
    wf = _load("flux_tdd")
    by_id = {n["id"]: n for n in wf["nodes"]}
    (lora,) = wt.nodes_of_type(wf, "TDDLoraLoader")
    wired = {(lk[2], by_id[lk[3]]["type"], by_id[lk[3]]["inputs"][lk[4]]["name"])
             for lk in wf["links"] if lk[1] == lora["id"] and lk[2] >= 3}
    assert wired == {(3, "TDDScheduler", "steps"), (4, "TDDSampler", "eta"), (5, "FluxGuidance", "guidance")}
    api = wt.to_api(wf, object_info)
    assert api[str(wt.nodes_of_type(wf, "TDDSampler")[0]["id"])]["inputs"]["eta"] == [str(lora["id"]), 4]
    note = wt.nodes_of_type(wf, "Note")[0]["widgets_values"][0]
    assert "eta 0." in note and "eta 0.2 is an option to try" in note and "eta 0.2." not in note


def test_flux_guidance_feeds_the_guider(object_info):
    """FLUX: FluxGuidance sits between the prompt and the guider (not left dangling)."""
    wf = _load("flux_tdd")
    by_id = {n["id"]: n for n in wf["nodes"]}
    (fg,) = wt.nodes_of_type(wf, "FluxGuidance")
    targets = {by_id[lk[3]]["type"] for lk in wf["links"] if lk[1] == fg["id"]}
    assert targets & {"BasicGuider", "TDDGuidance", "CFGGuider"}, targets
    if wt.nodes_of_type(wf, "TDDGuidance"):
        assert all(g["scale"] == 1.0 for g in wt.node_widgets(wf, object_info, "TDDGuidance"))


def test_sdxl_negative_prompt_is_empty(object_info):
    """TDD guidance uses the empty prompt as the unconditional input (docs/method.md §3)."""
    for name in ("sdxl_tdd_txt2img", "sdxl_tdd_img2img", "sdxl_tdd_controlnet", "ksampler_tdd"):
        wf = _load(name)
        by_id = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            neg = next((i for i in n.get("inputs", []) if i["name"] == "negative" and i["link"] is not None), None)
            if neg is None or n["type"] not in ("TDDGuidance", "KSampler", "ControlNetApplyAdvanced"):
                continue
            src = by_id[next(lk for lk in wf["links"] if lk[0] == neg["link"])[1]]
            if src["type"] == "CLIPTextEncode":
                assert wt.widget_values(src, object_info["CLIPTextEncode"])["text"] == "", name


def _server_errors_besides_files(server, api: dict) -> list[str]:
    """POST /prompt -> the validation errors that are not about a missing model / image file.
    (A workflow whose files all exist, such as one on the test pack's tiny model, is queued: valid.)"""
    status, payload = server.queue(api)
    if status == 200:
        server.wait(payload["prompt_id"])
        return []
    assert status == 400 and isinstance(payload, dict), payload
    node_errors = payload.get("node_errors") or {}
    if not node_errors:
        return [f"rejected without node errors: {payload.get('error')}"]
    bad = []
    for nid, ne in node_errors.items():
        for e in ne["errors"]:
            if not _about_a_file(e):
                bad.append(f"{ne['class_type']} {nid}: {e['type']}: {e['message']}: {e['details']}")
    return bad


def _about_a_file(error: dict) -> bool:
    """Whether a validation error only concerns user files (a model or image not on the test server).
    The TDD nodes' own check reports one "<input> = <value> ..." per problem, under every input name."""
    if error["type"] == "custom_validation_failed" and " = " in error.get("details", ""):
        named = re.findall(r"(?:^|; |- )(\w+) = ", error["details"])
        return bool(named) and all(wt.file_input_exts(name) for name in named)
    name = (error.get("extra_info") or {}).get("input_name", "")
    return error["type"] in ("value_not_in_list", "custom_validation_failed") and bool(wt.file_input_exts(name))


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_server_validates_all_but_model_files(path: Path, server, object_info):
    """The workflow, converted to the API format, passes the server's own prompt validation except
    for the model / image files the user has to download (absent on the test server)."""
    bad = _server_errors_besides_files(server, wt.to_api(wt.load(path), object_info))
    assert not bad, f"{path.name}:\n  " + "\n  ".join(bad)


def test_server_check_reports_broken_prompt(server, object_info):
    api = wt.to_api(_load("sdxl_tdd_txt2img"), object_info)
    for node in api.values():
        if node["class_type"] == "TDDScheduler":
            node["inputs"]["steps"] = 999
        if node["class_type"] == "VAEDecode":
            node["inputs"]["vae"][1] = 1  # the checkpoint's CLIP output
    bad = "\n".join(_server_errors_besides_files(server, api))
    assert "Value 999 bigger than max of 50: steps" in bad and "return_type_mismatch" in bad, bad


def test_server_serves_workflows_as_templates(server):
    """ComfyUI lists workflows/ as this pack's example workflows (Workflow > Browse Templates)."""
    templates = server._get("/workflow_templates")
    assert sorted(templates.get(harness.PACK_DIRNAME, [])) == sorted(IDS), templates
    served = server._get(f"/api/workflow_templates/{harness.PACK_DIRNAME}/{IDS[0]}.json")
    assert served == wt.load(WORKFLOWS[0])


# ------------------------------------------------------------------------------------------------
# The validator itself: a broken workflow is reported
# ------------------------------------------------------------------------------------------------

def _node(wf, node_type):
    return wt.nodes_of_type(wf, node_type)[0]


def test_validator_reports_broken_workflows(object_info):
    good = _load("sdxl_tdd_txt2img")
    assert wt.validate_workflow(good, object_info) == []

    def errors_of(mutate):
        wf = copy.deepcopy(good)
        mutate(wf)
        errs = wt.validate_workflow(wf, object_info)
        assert errs, "corruption not reported"
        return "\n".join(errs)

    # unknown node type
    def unknown(wf):
        _node(wf, "TDDSampler")["type"] = "TDDSamplerThatDoesNotExist"
    assert "unknown node type 'TDDSamplerThatDoesNotExist'" in errors_of(unknown)

    # out-of-range widgets (INT above max, FLOAT below min)
    def steps_too_big(wf):
        _node(wf, "TDDScheduler")["widgets_values"][0] = 999
    assert "'steps': 999 is above max 50" in errors_of(steps_too_big)

    def eta_negative(wf):
        _node(wf, "TDDSampler")["widgets_values"][0] = -0.5
    assert "'eta': -0.5 is below min 0" in errors_of(eta_negative)

    # mismatched link type: VAEDecode's vae fed from the checkpoint's CLIP output
    def clip_into_vae(wf):
        ck, dec = _node(wf, "CheckpointLoaderSimple"), _node(wf, "VAEDecode")
        slot = [i["name"] for i in dec["inputs"]].index("vae")
        lid = dec["inputs"][slot]["link"]
        lk = next(lk for lk in wf["links"] if lk[0] == lid)
        ck["outputs"][lk[2]]["links"].remove(lid)
        ck["outputs"][1]["links"].append(lid)
        lk[2], lk[5] = 1, "CLIP"
    err = errors_of(clip_into_vae)
    assert "type mismatch" in err and "'CLIP'" in err and "'vae'" in err, err
    assert "not listed" not in err and "has link" not in err, "only the type should be wrong:\n" + err

    # combo value not in the options; a BOOLEAN given as a string
    def bad_combo(wf):
        ks_wf = _load("ksampler_tdd")
        wf.clear()
        wf.update(ks_wf)
        _node(wf, "KSampler")["widgets_values"][4] = "no_such_sampler"
    assert "'sampler_name': 'no_such_sampler' not in combo options" in errors_of(bad_combo)

    def bool_as_string(wf):
        _node(wf, "TDDScheduler")["widgets_values"][1] = "false"
    assert "'non_equidistant': 'false' is not a boolean" in errors_of(bool_as_string)

    # a model-file combo must name a file with a model extension
    def lora_not_safetensors(wf):
        _node(wf, "TDDLoraLoader")["widgets_values"][0] = "sdxl_tdd_lora_weights.txt"
    assert "does not end with" in errors_of(lora_not_safetensors)

    # the control_after_generate value is expected after noise_seed: dropping it shifts the values
    def drop_control(wf):
        _node(wf, "RandomNoise")["widgets_values"] = [42]
        _node(wf, "TDDScheduler")["widgets_values"].append(3)
    err = errors_of(drop_control)
    assert "no value for widget 'noise_seed:control_after_generate'" in err
    assert "4 widgets_values for 3 widgets" in err

    # inconsistent link ids, dangling link, required socket left unconnected
    def dangling(wf):
        dec = _node(wf, "VAEDecode")
        dec["inputs"][0]["link"] = 9999
    err = errors_of(dangling)
    assert "missing link 9999" in err

    def unconnected(wf):
        sca = _node(wf, "SamplerCustomAdvanced")
        lid = sca["inputs"][0]["link"]
        sca["inputs"][0]["link"] = None
        wf["links"] = [lk for lk in wf["links"] if lk[0] != lid]
        for n in wf["nodes"]:
            for o in n.get("outputs", []):
                if o.get("links") and lid in o["links"]:
                    o["links"].remove(lid)
    assert "required input 'noise' (NOISE) is not connected" in errors_of(unconnected)


def test_widget_mapping_v1_and_v3_combos(object_info):
    """Both /object_info combo spellings map to combo widgets with their options."""
    v1 = wt.input_specs(object_info["KSampler"])
    v3 = wt.input_specs(object_info["TDDLoraLoader"])
    sampler = next(s for s in v1 if s.name == "sampler_name")
    lora = next(s for s in v3 if s.name == "lora_name")
    assert sampler.type == lora.type == "COMBO" and "tdd" in sampler.options
    assert isinstance(lora.options, list)
    names = [s.name for s in wt.widget_slots(object_info["KSampler"])]
    assert names == ["seed", "seed:control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert [s.name for s in wt.widget_slots(object_info["LoadImage"])] == ["image", "image:upload"]


def test_to_api_roundtrip(object_info):
    api = wt.to_api(_load("ksampler_tdd"), object_info)
    ks = next(v for v in api.values() if v["class_type"] == "KSampler")
    assert ks["inputs"]["sampler_name"] == "tdd" and ks["inputs"]["steps"] == 4
    assert all(isinstance(ks["inputs"][k], list) for k in ("model", "positive", "negative", "latent_image"))
    assert not any(v["class_type"] in wt.FRONTEND_ONLY for v in api.values())
    json.dumps(api)
