"""The embedded demo model: its loader node, its shipped weights, and the demo workflow end to end."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import harness
import workflow_tools as wt
from harness import run_node

REPO = harness.REPO
WEIGHTS = REPO / "demo" / "weights"
LORAS = REPO / "demo" / "loras"


def test_shipped_weights_fit_the_size_budget():
    files = sorted(WEIGHTS.glob("*.safetensors")) + sorted(LORAS.glob("*.safetensors"))
    assert {f.name for f in files} == {"demo_unet.safetensors", "demo_clip.safetensors", "demo_vae.safetensors",
                                       "demo_tdd_lora.safetensors"}
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024


def test_demo_dataset_is_seeded_and_captioned():
    from demo import dataset

    a, cap_a, scene = dataset.sample(0, 7)
    b, cap_b, _ = dataset.sample(0, 7)
    assert np.array_equal(a, b) and cap_a == cap_b and a.shape == (64, 64, 3)
    assert scene.colour in cap_a and scene.shape in cap_a
    assert not np.array_equal(a, dataset.sample(1, 7)[0])
    striped = dataset.render(dataset.Scene("square", "red", "striped", "center", "light"))
    solid = dataset.render(dataset.Scene("square", "red", "solid", "center", "light"))
    assert dataset.detail_energy(striped[None]) > 1.5 * dataset.detail_energy(solid[None])


def test_demo_loader_gives_model_clip_vae(host):
    import comfy.model_patcher
    import comfy.sd

    model, clip, vae = run_node(host, "TDDDemoCheckpointLoader", weights_dir="")
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    (cond,) = run_node(host, "CLIPTextEncode", clip=clip, text="a red circle in the center on a light background")
    assert cond[0][0].shape == (1, 77, 64)


def test_demo_loader_missing_or_corrupt_file_is_a_clear_error(host, tmp_path):
    with pytest.raises(ValueError, match=r"demo_unet.safetensors' is missing"):
        run_node(host, "TDDDemoCheckpointLoader", weights_dir=str(tmp_path))
    for f in WEIGHTS.glob("demo_*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "demo_vae.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"'demo_vae.safetensors' is corrupt"):
        run_node(host, "TDDDemoCheckpointLoader", weights_dir=str(tmp_path))


def test_demo_lora_is_listed_and_fits_the_demo_model(host):
    import folder_paths

    assert "demo_tdd_lora.safetensors" in folder_paths.get_filename_list("loras")
    model, clip, _ = run_node(host, "TDDDemoCheckpointLoader", weights_dir="")
    _, _, info = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name="demo_tdd_lora.safetensors",
                          strength_model=1.0, strength_clip=1.0)
    assert "kohya" in info and "method=tdd" in info


def run_demo_branch(server, object_info, prefix, text, seed=0, steps=None):
    api = wt.to_api(wt.load(REPO / "workflows" / "tdd_demo.json"), object_info)
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "CLIPTextEncode" and inputs["text"]:
            inputs["text"] = text
        if node["class_type"] == "SaveImage" and not inputs["filename_prefix"].startswith(prefix):
            inputs["filename_prefix"] = "unused/x"
        if node["class_type"] in ("KSampler", "RandomNoise"):
            inputs["seed" if "seed" in inputs else "noise_seed"] = seed
        if node["class_type"] == "TDDScheduler" and steps:
            inputs["steps"] = steps
    entry = server.run(api)
    (path,) = [p for p in server.output_images(entry) if prefix in str(p)]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


@pytest.mark.parametrize("prefix", ["tdd_demo/tdd", "tdd_demo/teacher"])
def test_demo_workflow_runs_and_depends_on_the_prompt(server, prefix):
    info = server.object_info()
    a = run_demo_branch(server, info, prefix, "a red striped circle at the top left on a light background")
    b = run_demo_branch(server, info, prefix, "a blue checked square at the bottom right on a dark background")
    for img in (a, b):
        assert img.shape == (64, 64, 3) and np.isfinite(img).all()
        assert img.std() > 5.0, "blank image"
    assert np.abs(a - b).mean() > 5.0, "two prompts with the same seed gave the same image"
    # the trained model follows the prompt: "light background" vs "dark background"
    assert np.median(a) > np.median(b) + 80, (np.median(a), np.median(b))


@pytest.mark.parametrize("folder,needle", [("missing", "is missing"), ("corrupt", "is corrupt")])
def test_demo_loader_error_over_http_keeps_the_server_running(server, tmp_path, folder, needle):
    weights = tmp_path / folder
    weights.mkdir()
    if folder == "corrupt":
        for f in WEIGHTS.glob("demo_*.safetensors"):
            shutil.copy(f, weights / f.name)
        (weights / "demo_unet.safetensors").write_bytes(b"not a safetensors file")
    graph = {"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights_dir": str(weights)}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                        "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                        "sampler_name": "tdd", "scheduler": "tdd", "denoise": 1.0}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "demo_bad"}}}
    with pytest.raises(harness.ComfyError, match=needle):
        server.run(graph)
    graph["1"]["inputs"]["weights_dir"] = ""
    assert server.output_images(server.run(graph))  # the next prompt succeeds
