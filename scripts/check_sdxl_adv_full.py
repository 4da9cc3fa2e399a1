"""The held-out-style check at full SDXL size: the adversarial preset's LoRA loads in the stock LoraLoader.

    .venv/bin/python scripts/check_sdxl_adv_full.py [--work .host/sdxl_full] [--resolution 64]

1. **build** a random-weight SDXL checkpoint from the host's own classes (ComfyUI's SDXL model
   config with SDXL's full UNet, its CLIP-L + CLIP-G text encoders from the host's bundled configs,
   an SDXL-shaped AutoencoderKL), saved in fp16 in the single-file checkpoint layout (``model.``,
   ``conditioner.`` and ``first_stage_model.`` keys) by the host's ``state_dict_for_saving``;
2. **train** with the CLI exactly as a user would, ``trainer/distill.py --teacher <that file>
   --adversarial --preset sdxl-adv``, overriding only steps (2: one discriminator step, one LoRA step), batch (1, no
   accumulation) and resolution (64 px), in a subprocess whose wall time and peak memory are reported;
3. **load** the LoRA with the stock nodes (CheckpointLoaderSimple -> LoraLoader) in an in-process
   ComfyUI and count the UNet weights it patched: 788 modules, every key of the file matched.

Needs about 20 GB of RAM (the trainer keeps the frozen base in fp32 on CPU) and 7 GB of disk; a
few minutes on 1 CPU core. Exits non-zero with the reason when any stage fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

log = logging.getLogger("check_sdxl_adv_full")
EXPECTED_MODULES = 788
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
             "use_temporal_resblock": False, "num_classes": "sequential", "adm_in_channels": 2816,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}
SDXL_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                         "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                         "attn_resolutions": [], "dropout": 0.0}}


def random_init_(module, seed: int) -> None:
    """Seeded weights for every tensor (the host's ops leave them uninitialised), as the demo model's."""
    from trainer.fileio import load_module

    load_module(REPO / "nodes" / "demo_model.py", "tdd_demo_model").init_(module, seed)


def build_checkpoint(path: Path, seed: int = 0) -> dict:
    """A random-weight SDXL checkpoint from host classes, in fp16; -> facts about it."""
    import torch

    from trainer.models import ensure_host

    ensure_host("cpu")
    import comfy.model_detection
    import comfy.sd
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
    if type(config).__name__ != "SDXL":
        raise SystemExit(f"the host resolved SDXL's UNet config to {type(config).__name__}, not SDXL")
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "model.", device=torch.device("cpu"))
    random_init_(model.diffusion_model, seed)
    clip = comfy.sd.CLIP(config.clip_target({}), embedding_directory=None, model_options={"dtype": torch.float16})
    random_init_(clip.cond_stage_model, seed + 1)
    vae = AutoencoderKL(**SDXL_VAE).to(torch.float16)
    random_init_(vae, seed + 2)
    sd = model.state_dict_for_saving(clip.get_sd(), vae.state_dict())
    params = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return {"unet_parameters": params, "tensors": len(sd), "file_gb": round(path.stat().st_size / 2 ** 30, 2)}


def train(ckpt: Path, out: Path, work: Path, resolution: int) -> dict:
    """The CLI in a subprocess, as a user runs it; -> wall time and the child's peak RSS."""
    from PIL import Image
    import numpy as np

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of a random texture")
    argv = [sys.executable, str(REPO / "trainer" / "distill.py"), "--teacher", str(ckpt), "--adversarial",
            "--preset", "sdxl-adv", "--max-steps", "2", "--batch-size", "1", "--accumulate-to", "1",
            "--resolution", str(resolution), "--data", str(data), "--out", str(out), "--run-dir", str(work / "run"),
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--overwrite"]  # (the last check's LoRA)
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run, not a resume
    log.info("running: %s", " ".join(argv))
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (peak RSS in KiB)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out.is_file():
        raise SystemExit(f"trainer/distill.py failed (exit status {code}); see its log above")
    peak_gb = usage.ru_maxrss / 2 ** 20
    return {"train_seconds": round(seconds, 1), "train_peak_rss_gb": round(peak_gb, 1)}


def load_with_stock_nodes(ckpt: Path, lora: Path, work: Path) -> dict:
    """CheckpointLoaderSimple -> LoraLoader in an in-process ComfyUI; -> what the LoRA patched."""
    import harness

    base = work / "comfy_base"
    for folder, src in (("checkpoints", ckpt), ("loras", lora)):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        link = base / "models" / folder / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    nodes = harness.inprocess_host(base)
    import comfy.utils

    model, clip, _ = harness.run_node(nodes, "CheckpointLoaderSimple", ckpt_name=ckpt.name)
    if type(model.model.model_config).__name__ != "SDXL":
        raise SystemExit(f"the host loaded {ckpt.name} as {type(model.model.model_config).__name__}, not SDXL")
    patched, _ = harness.run_node(nodes, "LoraLoader", model=model, clip=clip, lora_name=lora.name,
                                  strength_model=1.0, strength_clip=1.0)
    lora_sd = comfy.utils.load_torch_file(str(lora))
    modules = {k.rsplit(".", 2)[0] for k in lora_sd if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    from trainer.lora_format import read_tdd_metadata

    meta = read_tdd_metadata(lora)
    return {"file_modules": len(modules), "file_tensors": len(lora_sd), "patched_unet_weights": len(patched.patches),
            "unpatched_base_weights": len(model.patches), "tdd_method": meta.get("tdd_method"),
            "tdd_base_arch": meta.get("tdd_base_arch"), "lora_file_mb": round(lora.stat().st_size / 2 ** 20, 1)}


def stage(name: str, work: Path) -> dict:
    """Run one in-process stage (build, load) in a fresh interpreter: each imports the host its own
    way (the load stage needs ComfyUI's paths set up by the harness before anything imports comfy)
    and frees its memory on exit. -> the facts it printed as its last line."""
    proc = subprocess.run([sys.executable, __file__, "--stage", name, "--work", str(work)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} stage failed (exit status {proc.returncode}); see its log above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / ".host" / "sdxl_full"))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if it exists")
    ap.add_argument("--stage", choices=("build", "load"), help=argparse.SUPPRESS)  # internal: one stage
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, lora = work / "random_sdxl.safetensors", work / "sdxl_adv_lora.safetensors"
    if args.stage:
        facts = build_checkpoint(ckpt) if args.stage == "build" else load_with_stock_nodes(ckpt, lora, work)
        print(json.dumps(facts))
        return 0
    facts = {}
    if args.rebuild or not ckpt.is_file():
        start = time.monotonic()
        facts.update(stage("build", work))
        facts["build_seconds"] = round(time.monotonic() - start, 1)
        log.info("built %s: %s", ckpt, facts)
    facts.update(train(ckpt, lora, work, args.resolution))
    facts.update(stage("load", work))
    log.info("result: %s", json.dumps(facts))
    problems = []
    if facts["file_modules"] != EXPECTED_MODULES:
        problems.append(f"the LoRA file has {facts['file_modules']} modules, not {EXPECTED_MODULES}")
    if (facts["tdd_method"], facts["tdd_base_arch"]) != ("tdd-adv", "sdxl"):
        problems.append(f"the LoRA's metadata says method {facts['tdd_method']!r}, arch {facts['tdd_base_arch']!r}")
    if facts["patched_unet_weights"] != facts["file_modules"]:
        problems.append(f"the stock LoraLoader patched {facts['patched_unet_weights']} UNet weights for "
                        f"{facts['file_modules']} modules in the file")
    for p in problems:
        log.error("FAILED: %s", p)
    if not problems:
        log.info("OK: the sdxl-adv LoRA loads in the stock LoraLoader with all %d modules matched", EXPECTED_MODULES)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
