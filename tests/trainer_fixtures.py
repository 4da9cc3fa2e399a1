"""Fixtures for the trainer tests: the tiny host-class model, procedural PNG datasets, configs.

Also usable as a ``--teacher`` factory in subprocesses: ``--teacher tests/trainer_fixtures.py:tiny_sd15``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.fileio import load_module  # noqa: E402
from trainer.models import ensure_host  # noqa: E402

TINY_PY = REPO / "tests" / "tdd_test_nodes" / "tiny.py"
RESOLUTION = 64  # tiny VAE: 64 px -> 8x8 latent


def tiny_module():
    """``tests/tdd_test_nodes/tiny.py`` loaded by path (its package __init__ registers ComfyUI nodes)."""
    ensure_host("cpu")
    return load_module(TINY_PY, "tdd_trainer_tiny", register=True)


def tiny_sd15(seed: int | None = None):
    """(ModelPatcher, CLIP, VAE) of the tiny random-weight SD1.5 model (seed from $TDD_TINY_SEED, default 0)."""
    if seed is None:
        seed = int(os.environ.get("TDD_TINY_SEED", "0"))
    return tiny_module().build_tiny_sd15(seed)


def tiny_flux2():
    """``--teacher`` factory: (ModelPatcher, CLIP, VAE) of the tiny FLUX.2 of tests/tdd_test_nodes/families.py."""
    ensure_host("cpu")
    return load_module(REPO / "tests" / "tdd_test_nodes" / "families.py", "tdd_test_families").build("flux2", 0)


def make_images(folder, n: int = 4, size=(80, 64), captions: bool = True, seed: int = 0, jsonl: bool = False) -> Path:
    """``n`` procedural PNGs (gradients + a coloured square) with .txt captions (or a data.jsonl)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(n):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 * i % 255)], -1)
        c = rng.integers(0, 255, 3)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = c
        name = f"img_{i:03d}.png"
        Image.fromarray(img.astype(np.uint8)).save(folder / name)
        caption = f"a {colours[i % len(colours)]} square on a gradient"
        if captions and not jsonl:
            (folder / name).with_suffix(".txt").write_text(caption)
        recs.append({"path": name, "caption": caption})
    if jsonl:
        with open(folder / "data.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        return folder / "data.jsonl"
    return folder


def tiny_args(data, tmp, *extra) -> list[str]:
    """CLI arguments for a fast tiny run (rank 4, 64 px, 2 steps; no calibration, which
    tests/test_calibrate.py tests on its own: 32 prompts would take longer than the run)."""
    tmp = Path(tmp)
    return ["--teacher", f"{REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sd15", "--data", str(data),
            "--out", str(tmp / "lora.safetensors"), "--run-dir", str(tmp / "run"), "--resolution", str(RESOLUTION),
            "--rank", "4", "--alpha", "2", "--lr", "1e-3", "--max-steps", "2", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--num-workers", "0", "--no-calibrate", *map(str, extra)]


def train_config(data, tmp, **kw):
    """A :class:`trainer.config.TrainConfig` for a fast tiny run in ``tmp`` (overrides in ``kw``; no
    calibration unless ``calibrate=True``)."""
    from trainer.config import TrainConfig

    base = dict(data=str(data), out=str(Path(tmp) / "lora.safetensors"), run_dir=str(Path(tmp) / "run"),
                resolution=RESOLUTION, rank=4, alpha=2, lr=1e-3, max_steps=2, batch_size=2, device="cpu",
                progress=False, num_workers=0, calibrate=False)
    base.update(kw)
    return TrainConfig(**base)


def read_log(run_dir) -> list[dict]:
    import csv

    with open(Path(run_dir) / "log.csv") as f:
        return list(csv.DictReader(f))


def lora_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def fixed_batch_losses(teacher, x0, cond, uncond, steps: int, lr: float) -> list[float]:
    """The TDD loss (L2) of one fixed batch over ``steps`` AdamW steps of a fresh rank-4 LoRA on ``teacher``
    (the same draws every step: a falling loss means the student learns the teacher's targets)."""
    import torch

    from trainer.algorithm import StepConfig, TargetSampler, compute_loss, draw_batch
    from trainer.config import TrainConfig
    from trainer.lora import LoRANetwork

    network = LoRANetwork(teacher.lora_targets(), rank=4, alpha=4, seed=0).attach()
    try:
        opt = torch.optim.AdamW(network.parameters(), lr=lr)
        draws = draw_batch(TargetSampler("tdd"), 0, list(range(x0.shape[0])), x0.shape[1:], 0.0)
        sched = teacher.schedule(TrainConfig())

        def frozen(z, t, c):
            with network.disabled():
                return teacher.x0(z, t, c)
        losses = []
        for _ in range(steps):
            loss = compute_loss(teacher.x0, frozen, x0, cond, uncond, draws, sched, StepConfig(loss="l2"))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        network.detach_hooks()
    return losses


def subprocess_env() -> dict:
    """Environment for trainer subprocesses: one thread each, no inherited torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def stop_while_calibrating(cmd: list[str], cwd, sig) -> tuple[int, float, str]:
    """Run the trainer command ``cmd`` (stderr to a file), send ``sig`` a second after its calibration
    progress bar appears -> (exit status, seconds from the signal to the exit, stderr)."""
    import subprocess
    import time

    err_path = Path(cwd) / "stderr.txt"
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None and "calibrate:" not in err_path.read_text():
            time.sleep(0.1)
        time.sleep(1.0)
        assert p.poll() is None, err_path.read_text()[-3000:]
        sent = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=60)
        return p.returncode, time.monotonic() - sent, err_path.read_text()
    finally:
        if p.poll() is None:
            p.kill()


def flat(sd: dict):
    """All tensors of a state dict as one fp32 vector (sorted keys)."""
    import torch

    return torch.cat([sd[k].flatten().float() for k in sorted(sd)])


# ------------------------------------------------------------------------------------------------
# Full-size architectures without weights (meta device), for key-mapping tests
# ------------------------------------------------------------------------------------------------
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
FULL_UNET_CONFIGS = {
    "sd15": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8},
    "sd2x": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_linear_in_transformer": True,
             "context_dim": 1024, "num_head_channels": 64},
    "sdxl": {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
             "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
}


def meta_model(arch: str):
    """A full-size ``comfy.model_base`` model of ``arch`` on the meta device (host classes, no weights)."""
    import torch

    ensure_host("cpu")
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(dict(FULL_UNET_CONFIGS[arch]))
    assert config is not None, arch
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, "model.", device=torch.device("meta"))


def meta_flux():
    """A (shrunken) FLUX model on the meta device: a flow-matching architecture."""
    import torch

    ensure_host("cpu")
    import comfy.supported_models

    unet_config = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                   "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True, "txt_ids_dims": []}
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, "model.", device=torch.device("meta"))


def tiny_sd2v(seed: int = 0):
    """The tiny UNet as an SD2.x v-prediction model (host SD20 config + BaseModel(V_PREDICTION)), tiny CLIP/VAE."""
    tiny = tiny_module()
    unet = tiny.build_tiny_unet(seed, family="SD20", model_type="V_PREDICTION", use_linear_in_transformer=True)
    return unet, tiny.build_tiny_clip(seed), tiny.build_tiny_vae(seed)


def tiny_sdxl(seed: int = 0):
    """The tiny UNet as an SDXL-class model (ADM conditioning from pooled text + sizes), tiny CLIP/VAE."""
    tiny = tiny_module()
    unet = tiny.build_tiny_unet(seed, family="SDXL", use_linear_in_transformer=True, num_classes="sequential",
                                adm_in_channels=tiny.CONTEXT_DIM + 6 * 256)
    return unet, tiny.build_tiny_clip(seed), tiny.build_tiny_vae(seed)
