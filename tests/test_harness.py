"""The test harness itself against the real host: the tiny model, its LoRAs, the server."""
from __future__ import annotations

import torch
from PIL import Image

import harness


def test_import_failure_parser():
    log = "\n".join([
        "Cannot import /x/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'",
        "IMPORT FAILED: nodes_audio.py",
        "   0.0 seconds (IMPORT FAILED): /b/custom_nodes/tdd-comfyui",
        "Cannot import /b/custom_nodes/tdd-comfyui module for custom nodes: boom",
        "   0.1 seconds: /b/custom_nodes/tdd_test_nodes",
        "   0.0 seconds (IMPORT FAILED): /b/custom_nodes/other-pack",
    ])
    assert harness.import_failures(log) == [
        "0.0 seconds (IMPORT FAILED): /b/custom_nodes/tdd-comfyui",
        "Cannot import /b/custom_nodes/tdd-comfyui module for custom nodes: boom",
    ]
    assert harness.import_failures(log, names=("tdd_test_nodes",)) == []
    assert len(harness.all_import_failures(log)) == 5


def test_inprocess_host_has_test_node(host):
    assert "TDDTestTinyModel" in host.NODE_CLASS_MAPPINGS
    assert "KSampler" in host.NODE_CLASS_MAPPINGS


def test_tiny_model_is_seeded(tiny):
    a = tiny.build_tiny_unet(3).model.diffusion_model.state_dict()
    b = tiny.build_tiny_unet(3).model.diffusion_model.state_dict()
    c = tiny.build_tiny_unet(4).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_txt2img_in_process(host):
    model, clip, vae = harness.run_node(host, "TDDTestTinyModel", seed=0)
    pos = harness.run_node(host, "CLIPTextEncode", clip=clip, text="a red cube")[0]
    neg = harness.run_node(host, "CLIPTextEncode", clip=clip, text="")[0]
    lat = harness.run_node(host, "EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    out = harness.run_node(host, "KSampler", model=model, seed=0, steps=2, cfg=2.0, sampler_name="euler",
                           scheduler="normal", positive=pos, negative=neg, latent_image=lat, denoise=1.0)[0]
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    img = harness.run_node(host, "VAEDecode", samples=out, vae=vae)[0]
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_tiny_lora_keys_all_map(host, tiny, lora_files):
    import comfy.lora
    import comfy.utils

    model = tiny.build_tiny_unet(0)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = comfy.utils.load_torch_file(str(lora_files["good"]), safe_load=True)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith("_down.weight") or k.endswith("_up.weight") else k.rsplit(".", 1)[0]
                for k in sd}
    assert prefixes and all(p in key_map for p in prefixes)
    patches = comfy.lora.load_lora(sd, key_map)
    assert len(patches) == len(prefixes)

    foreign = comfy.utils.load_torch_file(str(lora_files["sdxl"]), safe_load=True)
    assert comfy.lora.load_lora(foreign, key_map) == {}


def test_flux_lora_maps_nothing(host, tiny, tmp_path):
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(tiny.build_tiny_unet(0).model, {})
    tiny.write_foreign_lora(tmp_path / "flux.safetensors", kind="flux")
    sd = comfy.utils.load_torch_file(str(tmp_path / "flux.safetensors"), safe_load=True)
    assert comfy.lora.load_lora(sd, key_map) == {}


def test_server_loads_test_pack(server):
    assert server.import_failures(names=(harness.TEST_PACK_DIRNAME,)) == []
    info = server.object_info("TDDTestTinyModel")
    assert "TDDTestTinyModel" in info


def test_server_loads_tdd_pack_without_import_failure(server):
    """Fails until the pack's root __init__.py / nodes import cleanly (expected while they land)."""
    failures = server.import_failures(names=(harness.PACK_DIRNAME,))
    assert failures == [], "\n".join(failures)


def host_failures(log_text: str) -> list[str]:
    """Import/entry-point failures of anything, the host's built-ins too, except its audio nodes when
    torchaudio is not installed (a host without it: the registry's 0.3.75 fallback)."""
    try:
        import torchaudio  # noqa: F401
        audio_ok = True
    except ImportError:
        audio_ok = False
    return [f for f in harness.all_import_failures(log_text) if audio_ok or "audio" not in f]


def test_inprocess_host_loads_every_extension(host):
    """The in-process host starts as main.py does: no built-in extension fails (on ComfyUI 0.33 one
    did, nodes_replacements.py, when no PromptServer existed)."""
    assert harness.inprocess_log(), "nothing was logged while the host loaded"
    assert host_failures(harness.inprocess_log()) == []


def test_server_loads_every_extension(server):
    assert host_failures(server.log_text()) == []


def test_stock_txt2img_graph(server):
    entry = server.run(harness.tiny_txt2img_graph(seed=1, prefix="harness_txt2img"))
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].is_file()
    with Image.open(images[0]) as im:
        assert im.size == (64, 64)


def test_stock_lora_loader(server):
    before = len(server.log_text())
    entry = server.run(harness.tiny_txt2img_graph(seed=2, prefix="harness_lora", lora="tiny_tdd.safetensors"))
    assert len(server.output_images(entry)) == 1
    new_log = server.log_text()[before:]
    assert "lora key not loaded" not in new_log, new_log[-3000:]


def test_server_reports_validation_errors(server):
    g = harness.tiny_txt2img_graph()
    g["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    status, payload = server.queue(g)
    assert status == 400 and "5" in payload["node_errors"]
