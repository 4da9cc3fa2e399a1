"""Bake and share: the shipped workflow that merges a TDD LoRA into its checkpoint
(``workflows/sdxl_tdd_bake_checkpoint.json``: checkpoint -> TDD LoRA Loader -> CheckpointSave).

The shipped graph runs on the real server with its checkpoint loader swapped for the tiny test
model and its LoRA for the tiny test LoRA; the checkpoint it writes is loaded back into the host's
model classes and must give the LoRA-patched model's images, not the base model's."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import safetensors.torch
import torch

import harness
import workflow_tools as wt
from harness import run_node

BAKE = harness.REPO / "workflows" / "sdxl_tdd_bake_checkpoint.json"
SEED = 3
PROMPT = "a red cube"


def baked_on_tiny_model(api: dict, lora_name: str, prefix: str) -> dict:
    """The bake workflow's API graph on the tiny test model: its checkpoint loader becomes
    TDDTestTinyModel, its LoRA the test LoRA, its CheckpointSave prefix ``prefix``."""
    loaders = [n for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert len(loaders) == 1, "the bake workflow loads one checkpoint"
    loaders[0].update(class_type="TDDTestTinyModel", inputs={"seed": SEED})
    for node in api.values():
        if node["class_type"] == "TDDLoraLoader":
            node["inputs"]["lora_name"] = lora_name
        if node["class_type"] == "CheckpointSave":
            node["inputs"]["filename_prefix"] = prefix
    return api


def split_checkpoint(path) -> dict[str, dict]:
    """A CheckpointSave file (SD1.5 layout) -> {"unet", "clip", "vae"} state dicts as the host's
    model classes name them (the inverse of the SD1.5 config's ``process_*_for_saving``)."""
    sd = safetensors.torch.load_file(str(path))
    parts = {"unet": {}, "clip": {}, "vae": {}}
    prefixes = {"model.diffusion_model.": ("unet", ""), "cond_stage_model.": ("clip", "clip_l."),
                "first_stage_model.": ("vae", "")}
    for key, tensor in sd.items():
        for prefix, (part, new_prefix) in prefixes.items():
            if key.startswith(prefix):
                parts[part][new_prefix + key[len(prefix):]] = tensor
                break
        else:
            raise AssertionError(f"unexpected key {key!r} in the baked checkpoint")
    return parts


def load_tiny_checkpoint(tiny, path):
    """-> (ModelPatcher, CLIP, VAE) of the tiny model with the weights of a saved checkpoint."""
    builders = tiny._host_builders()
    parts = split_checkpoint(path)
    return (builders.build_unet(tiny.TINY_UNET_CONFIG, tiny.TINY_NUM_HEADS, state_dict=parts["unet"]),
            builders.build_clip(tiny.TINY_TEXT_CONFIG, state_dict=parts["clip"]),
            builders.build_vae(tiny.TINY_VAE_CONFIG, state_dict=parts["vae"]))


def sample(host, model, clip, vae) -> np.ndarray:
    """A seeded 2-step txt2img image (stock nodes, in-process host, inference mode as the server
    runs nodes) as a float array."""
    with torch.inference_mode():
        (pos,) = run_node(host, "CLIPTextEncode", clip=clip, text=PROMPT)
        (neg,) = run_node(host, "CLIPTextEncode", clip=clip, text="")
        (latent,) = run_node(host, "EmptyLatentImage", width=64, height=64, batch_size=1)
        (out,) = run_node(host, "KSampler", model=model, positive=pos, negative=neg, latent_image=latent, seed=0,
                          steps=2, cfg=2.0, sampler_name="tdd", scheduler="tdd", denoise=1.0)
        (image,) = run_node(host, "VAEDecode", samples=out, vae=vae)
        return image.float().numpy()


def test_bake_workflow_notes_the_baked_models_settings():
    """The note gives the baked SDXL checkpoint's settings (the README's SDXL row) and warns
    against applying the LoRA twice."""
    wf = wt.load(BAKE)
    text = "\n".join(v for n in wf["nodes"] if n["type"] in wt.NOTE_TYPES for v in n["widgets_values"])
    assert "4 steps, guidance 1.7, eta 0.2" in text
    assert "sampler_name tdd, scheduler tdd, steps 4, cfg 1.7" in text
    assert "WITHOUT a LoRA loader" in text
    types = {n["type"] for n in wf["nodes"]}
    assert {"CheckpointLoaderSimple", "TDDLoraLoader", "CheckpointSave"} <= types


@pytest.mark.slow
def test_baked_checkpoint_reproduces_the_lora_patched_model(server, host, tiny, lora_files):
    info = server.object_info()
    prefix = f"checkpoints/tdd_bake_test_{uuid.uuid4().hex[:8]}"
    api = baked_on_tiny_model(wt.to_api(wt.load(BAKE), info), lora_files["good"].name, prefix)
    server.run(api)
    (saved,) = sorted((server.base_dir / "output").glob(f"{prefix}_*.safetensors"))

    (lora_node,) = [n["inputs"] for n in api.values() if n["class_type"] == "TDDLoraLoader"]
    base_model, base_clip, base_vae = tiny.build_tiny_sd15(SEED)
    patched = run_node(host, "TDDLoraLoader", model=base_model, clip=base_clip, lora_name=lora_node["lora_name"],
                       strength_model=lora_node["strength_model"], strength_clip=lora_node["strength_clip"])
    want = sample(host, patched[0], patched[1], base_vae)
    base = sample(host, base_model, base_clip, base_vae)
    got = sample(host, *load_tiny_checkpoint(tiny, saved))

    assert np.abs(want - base).mean() > 1e-2, "the test LoRA does not change the image: the test would prove nothing"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
