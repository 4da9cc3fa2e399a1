"""The embedded demo model: its loader node, its shipped weights, and the demo workflow end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import harness
import workflow_tools as wt
from harness import run_node

REPO = harness.REPO
WEIGHTS = REPO / "demo" / "weights"
LORAS = REPO / "demo" / "loras"
SHIPPED, USER = "shipped (demo/weights)", "models/tdd_demo"  # the loader's weights choices


def test_shipped_weights_fit_the_size_budget():
    files = sorted(WEIGHTS.glob("*.safetensors")) + sorted(LORAS.glob("*.safetensors"))
    assert {f.name for f in files} == {"demo_unet.safetensors", "demo_clip.safetensors", "demo_vae.safetensors",
                                       "demo_tdd_lora.safetensors"}
    every_demo_file = [f for f in (REPO / "demo").rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    assert sum(f.stat().st_size for f in every_demo_file) <= 30 * 1024 * 1024  # weights, LoRA, classifier, scripts


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

    model, clip, vae = run_node(host, "TDDDemoCheckpointLoader", weights=SHIPPED)
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    (cond,) = run_node(host, "CLIPTextEncode", clip=clip, text="a red circle in the center on a light background")
    assert cond[0][0].shape == (1, 77, 64)


def user_weights(comfy_base, state: str):
    """Fill models/tdd_demo of the test base: "missing" (empty), "corrupt" (one file damaged) or "good"."""
    folder = comfy_base / "models" / "tdd_demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if state != "missing":
        for f in WEIGHTS.glob("demo_*.safetensors"):
            shutil.copy(f, folder / f.name)
    if state == "corrupt":
        (folder / "demo_vae.safetensors").write_bytes(b"\x00" * 64)
    return folder


def test_demo_loader_missing_or_corrupt_file_is_a_clear_error(host, comfy_base):
    try:
        user_weights(comfy_base, "missing")
        with pytest.raises(FileNotFoundError, match=r"models/tdd_demo does not hold the demo weights "
                                                    r"\(demo_unet.safetensors, .* missing\): put "):
            run_node(host, "TDDDemoCheckpointLoader", weights=USER)
        user_weights(comfy_base, "corrupt")
        with pytest.raises(ValueError, match=r"'demo_vae.safetensors' is corrupt"):
            run_node(host, "TDDDemoCheckpointLoader", weights=USER)
        user_weights(comfy_base, "good")  # the user's own copy of the weights loads
        model, *_ = run_node(host, "TDDDemoCheckpointLoader", weights=USER)
        shipped, *_ = run_node(host, "TDDDemoCheckpointLoader", weights=SHIPPED)
        for a, b in zip(model.model.state_dict().values(), shipped.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        shutil.rmtree(comfy_base / "models" / "tdd_demo", ignore_errors=True)


def test_demo_lora_is_listed_and_fits_the_demo_model(host):
    import folder_paths

    assert "demo_tdd_lora.safetensors" in folder_paths.get_filename_list("loras")
    model, clip, _ = run_node(host, "TDDDemoCheckpointLoader", weights=SHIPPED)
    _, _, info, *_ = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name="demo_tdd_lora.safetensors",
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


def test_demo_workflow_samples_with_the_settings_measured_for_its_lora(server):
    """The TDD branch takes steps, eta and guidance from TDD LoRA Loader, and the shipped demo LoRA
    carries its calibration (so the loader hands out measured values, not the SDXL reference's)."""
    from trainer.lora_format import read_header_metadata

    api = wt.to_api(wt.load(REPO / "workflows" / "tdd_demo.json"), server.object_info())
    (loader,) = [k for k, n in api.items() if n["class_type"] == "TDDLoraLoader"]
    wired = {n["class_type"]: n["inputs"] for n in api.values()}
    assert wired["TDDScheduler"]["steps"] == [loader, 3]
    assert wired["TDDSampler"]["eta"] == [loader, 4]
    assert wired["TDDGuidance"]["scale"] == [loader, 5]
    meta = read_header_metadata(REPO / "demo" / "loras" / "demo_tdd_lora.safetensors")
    table = json.loads(meta["tdd_calibration"])
    best = table["best"][meta["tdd_recommended_steps"]]
    assert (float(meta["tdd_recommended_guidance"]), float(meta["tdd_recommended_eta"])) == (
        best["guidance"], best["eta"])


@pytest.mark.parametrize("state,needle", [("missing", "does not hold the demo weights"), ("corrupt", "is corrupt")])
def test_demo_loader_error_over_http_keeps_the_server_running(server, comfy_base, state, needle):
    graph = {"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights": USER}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                        "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                        "sampler_name": "tdd", "scheduler": "tdd", "denoise": 1.0}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "demo_bad"}}}
    try:
        user_weights(comfy_base, state)
        with pytest.raises(harness.ComfyError, match=needle):
            server.run(graph)
    finally:
        shutil.rmtree(comfy_base / "models" / "tdd_demo", ignore_errors=True)
    graph["1"]["inputs"]["weights"] = SHIPPED
    assert server.output_images(server.run(graph))  # the next prompt succeeds


def test_demo_loader_takes_no_server_path(server, tmp_path):
    """A client cannot point the loader at an arbitrary folder: the prompt is refused before it runs,
    naming the input and the allowed choices, and says nothing about that path's files."""
    for f in WEIGHTS.glob("demo_*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    status, payload = server.queue({"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights": str(tmp_path)}},
                                    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert status == 400, payload
    text = str(payload["node_errors"])
    assert "weights" in text and repr(SHIPPED) in text and repr(USER) in text and "not an allowed value" in text


@pytest.mark.slow
def test_make_demo_writes_its_grid_and_leaves_no_server_folder(tmp_path, monkeypatch):
    """`make demo` (demo/run_demo.py) end to end: its own ComfyUI server, the grid of teacher vs TDD,
    the speed-up; the server's temporary base directory is removed afterwards."""
    import tempfile

    from demo import run_demo

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert run_demo.main(["--seeds", "0", "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height > 4 * 64 and grid.width > 3 * 64  # 4 prompts x 1 seed, 3 columns
    assert list(scratch.iterdir()) == []
