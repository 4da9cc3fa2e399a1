"""The pack inside a real ComfyUI server, driven over HTTP as a user's browser would."""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
from PIL import Image

import harness

TDD_NODES = {
    "TDDScheduler": ["model", "steps", "non_equidistant", "denoise"],
    "TDDSampler": ["eta", "x0_clip_steps", "batch_stable_noise"],
    "TDDGuidance": ["model", "positive", "negative", "scale", "guidance_start", "guidance_end", "rescale"],
    "TDDX0Clip": ["model", "mode", "clip_steps", "ratio", "max_value"],
    "TDDLoraLoader": ["model", "lora_name", "strength_model", "strength_clip", "clip", "at_steps"],
}


def tdd_graph(lora="tiny_tdd.safetensors", steps=4, eta=0.2, seed=0, text="a red circle at the top left"):
    """TDDTestTinyModel -> TDD LoRA Loader -> TDD x0 Clip -> TDD Guidance + TDD Scheduler + TDD Sampler
    -> SamplerCustomAdvanced -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "TDDTestTinyModel", "inputs": {"seed": 0}},
        "2": {"class_type": "TDDLoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "TDDX0Clip", "inputs": {"model": ["2", 0], "mode": "clamp", "clip_steps": 1,
                                                    "ratio": 0.995, "max_value": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": text}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "6": {"class_type": "TDDGuidance", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                      "scale": 1.7, "guidance_start": 0.0, "guidance_end": 0.5,
                                                      "rescale": 0.0}},
        "7": {"class_type": "TDDScheduler", "inputs": {"model": ["3", 0], "steps": steps, "non_equidistant": False,
                                                       "denoise": 1.0}},
        "8": {"class_type": "TDDSampler", "inputs": {"eta": eta, "x0_clip_steps": 0}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["6", 0],
                                                                 "sampler": ["8", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["10", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "tdd_server"}},
    }


def combo_options(spec) -> list:
    """Choices of a combo input in /object_info (V1: [choices, opts]; V3: ["COMBO", {"options": ...}])."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def image_of(server, entry) -> np.ndarray:
    (path,) = server.output_images(entry)
    return np.asarray(Image.open(path), dtype=np.float32)


def test_pack_imports_without_failure(server):
    assert server.import_failures(names=(harness.PACK_DIRNAME,)) == []
    assert "tdd-comfyui" in server.log_text()


def test_no_import_failures_but_the_audio_modules_without_torchaudio(server):
    """`make run` logs no IMPORT FAILED line: scripts/bootstrap.sh installs torchaudio (ComfyUI 0.33
    needs it to start). Without torchaudio (a host of your own) only the host's audio nodes may fail,
    never this pack."""
    audio = re.compile(r"^(IMPORT FAILED: |Cannot import \S*/comfy_extras/)nodes_audio(_encoder)?\.py\b")
    failures = harness.all_import_failures(server.log_text())
    if importlib.util.find_spec("torchaudio") is not None:
        assert failures == []
    else:
        assert all(audio.search(f) for f in failures), failures


def test_object_info_lists_every_node_with_inputs_and_tooltips(server):
    info = server.object_info()
    for node, inputs in TDD_NODES.items():
        assert node in info, f"{node} missing from /object_info"
        spec = info[node]["input"]
        listed = {**spec.get("required", {}), **spec.get("optional", {})}
        assert sorted(listed) == sorted(inputs)
        for name, (_, options) in listed.items():
            assert options.get("tooltip"), f"{node}.{name} has no tooltip"
        assert info[node]["display_name"].startswith("TDD ")
    ks = info["KSampler"]["input"]["required"]
    assert "tdd" in ks["sampler_name"][0] and "tdd" in ks["scheduler"][0]
    assert "tdd" in combo_options(info["KSamplerSelect"]["input"]["required"]["sampler_name"])
    assert "tdd" in combo_options(info["BasicScheduler"]["input"]["required"]["scheduler"])
    assert "tiny_tdd.safetensors" in combo_options(info["TDDLoraLoader"]["input"]["required"]["lora_name"])


def test_all_tdd_nodes_in_one_graph(server):
    entry = server.run(tdd_graph())
    img = image_of(server, entry)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0
    again = image_of(server, server.run(tdd_graph()))
    np.testing.assert_array_equal(img, again)  # same seed, same image
    other = image_of(server, server.run(tdd_graph(seed=1)))
    assert np.abs(other - img).max() > 0


def test_stock_ksampler_with_tdd_sampler_and_scheduler(server):
    entry = server.run(harness.tiny_txt2img_graph(seed=3, steps=4, sampler="tdd", scheduler="tdd", cfg=1.7,
                                                  lora="tiny_tdd.safetensors", prefix="tdd_ksampler"))
    img = image_of(server, entry)
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert server.history()  # /history holds it
    advanced = harness.tiny_txt2img_graph(seed=3, steps=4, sampler="tdd", scheduler="tdd", prefix="tdd_adv")
    advanced["5"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "tdd",
        "scheduler": "tdd", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    assert image_of(server, server.run(advanced)).std() > 0


def assert_rejected(server, graph, *needles):
    status, payload = server.queue(graph)
    if status == 200:  # accepted: must fail at execution with a node error
        entry = server.wait(payload["prompt_id"], timeout=300)
        err = harness.execution_error(entry)
        assert err is not None, "a bad input ran without error"
        text = err["exception_message"]
    else:
        text = str(payload)
    for needle in needles:
        assert needle in text, f"{needle!r} not in error: {text[:2000]}"
    return text


@pytest.mark.parametrize("case,patch,needles", [
    ("steps too many", ("7", "steps", 51), ["steps", "51"]),
    ("steps zero", ("7", "steps", 0), ["steps", "0"]),
    ("eta above one", ("8", "eta", 1.5), ["eta", "1.5"]),
    ("eta negative", ("8", "eta", -0.1), ["eta", "-0.1"]),
    ("lora of another architecture", ("2", "lora_name", "sdxl_other.safetensors"),
     ["sdxl_other.safetensors", "does not fit this model", "LoRA modules have no matching layer"]),
    ("corrupt lora", ("2", "lora_name", "corrupt.safetensors"), ["corrupt.safetensors", "corrupt"]),
    ("missing lora", ("2", "lora_name", "missing.safetensors"), ["missing.safetensors", "not found in models/loras"]),
])
def test_bad_input_is_a_clear_error_and_the_server_keeps_running(server, case, patch, needles):
    graph = tdd_graph()
    node, name, value = patch
    graph[node]["inputs"][name] = value
    assert_rejected(server, graph, *needles)
    entry = server.run(tdd_graph(seed=5))  # the next prompt succeeds
    assert image_of(server, entry).std() > 0
