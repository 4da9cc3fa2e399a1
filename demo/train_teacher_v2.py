"""The demo model's next training recipe (VAE, then UNet + text encoder, then the VAE decoder), being
developed toward a teacher that draws >= 90% of every prompted attribute; the shipped weights are
still demo/train_teacher.py's (``make demo-model``). Where it stands: docs/demo_model.md.

    .venv/bin/python demo/train_teacher_v2.py [--phase all|vae|vae_focus|unet|decoder|assemble] [--threads 1]

Seeded phases, each reading and writing fp32 state in ``--work`` (default ``.host/teacher_work``):

1. ``vae``: the autoencoder, first on 32x32 crops around the shape (4x cheaper per image, and every
   crop holds the shape), then on whole 64x64 images; L1 + MSE + an edge loss, cosine lr. Its latent
   scale is folded into the weights so that ``latent * 0.18215`` has unit std, as SD1.5's.
2. ``vae_focus``: more of the same with the loss weighted ``--fg-weight`` times on the shape's region
   (:func:`foreground_weight`): without it the colours wash out towards the background.
3. ``unet``: the UNet with the text encoder on the VAE's latents (a fresh posterior sample per step),
   eps-prediction on the SD1.5 schedule, 10% empty prompts for classifier-free guidance, cosine lr
   and an EMA of the weights (saved every 500 steps to ``--work`` as ``unet_ema_<step>.safetensors``).
4. ``decoder``: the VAE decoder alone with the encoder frozen, so the latent space the UNet learnt
   stays valid. It needs only phase 2, so it may run beside phase 3 (another process, another core).
5. ``assemble``: the three weight sets into ``--out`` (default ``.host/teacher_v2``) as fp16 safetensors, with the merged
   training record ``teacher_train.json``.

Every random draw comes from the phase's own generator, so a phase's result does not depend on
which phases ran before it in the same process (bit-identical at the same ``--threads``). Each phase
logs the attribute classifier's accuracy on VAE reconstructions. Model card: docs/demo_model.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from demo import dataset  # noqa: E402
from demo.train_teacher import encode_dataset, fold_latent_scale, images, load_demo_module, train_unet  # noqa: E402
from trainer.fileio import atomic_write_text  # noqa: E402
from trainer.lora_format import atomic_save_safetensors  # noqa: E402
from trainer.models import ensure_host  # noqa: E402

log = logging.getLogger("demo.train_teacher_v2")
PHASES = ("vae", "vae_focus", "unet", "decoder")


def shape_crops(seed, start, n, size=32):
    """``n`` dataset images cut to ``size`` x ``size`` crops that hold the shape, on the latent grid
    (offsets are multiples of 8, so a crop's latents are a window of the whole image's)."""
    out = []
    for i in range(start, start + n):
        img, _, scene = dataset.sample(seed, i)
        row, col = dataset.POSITIONS[scene.position]
        cy, cx = ((row + 0.5) * dataset.SIZE / 3, (col + 0.5) * dataset.SIZE / 3)
        top, left = (int(np.clip(round((c - size / 2) / 8) * 8, 0, dataset.SIZE - size)) for c in (cy, cx))
        out.append(img[top:top + size, left:left + size])
    arr = np.stack(out).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return torch.from_numpy(arr)


def cosine_lr(step, steps, peak, warmup, floor=0.05):
    """Linear warm-up to ``peak``, then a cosine down to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def foreground_weight(x, weight):
    """Per-pixel loss weight: ``weight`` on the shape's region (pixels away from the image's
    background, its median colour, dilated by 4 pixels so that the background-coloured gaps of stripes,
    checks and outlines count as the shape's too), 1 elsewhere. The shape covers about a tenth of an
    image: an unweighted loss lets the autoencoder wash its colour out towards the background
    (measured: 36% colour accuracy), and weighting only the coloured pixels teaches it to paint the
    gaps over (measured: 43% pattern accuracy)."""
    if weight == 1:
        return torch.ones_like(x[:, :1])
    background = x.flatten(2).median(dim=2).values[..., None, None]
    shape = ((x - background).abs().sum(1, keepdim=True) > 0.15).float()
    return 1 + (weight - 1) * F.max_pool2d(shape, 9, stride=1, padding=4)


def image_loss(rec, x, fg_weight=1):
    """L1 + 0.5 MSE + an edge loss (L1 on the images' horizontal and vertical finite differences, which
    keeps corners, stripes, checks and outlines crisp), each weighted by :func:`foreground_weight`."""
    w = foreground_weight(x, fg_weight)
    d = rec - x
    dx, dy = d[..., :, 1:] - d[..., :, :-1], d[..., 1:, :] - d[..., :-1, :]
    return ((d.abs() + 0.5 * d ** 2) * w).mean() + (dx.abs() * w[..., :, 1:]).mean() + (dy.abs() * w[..., 1:, :]).mean()


def posterior(ae, x):
    mean, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def train_autoencoder(ae, params, batches, steps, lr, gen, name, kl_weight=None, fg_weight=1):
    """AdamW over ``params`` on ``batches(step)``; the KL term only when the encoder trains."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.monotonic()
    for step in range(steps):
        x = batches(step)
        if kl_weight is None:
            with torch.no_grad():
                mean, logvar = posterior(ae, x)
        else:
            mean, logvar = posterior(ae, x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
        rec = ae.decoder(ae.post_quant_conv(z))
        loss = image_loss(rec, x, fg_weight)
        if kl_weight is not None:
            loss = loss + kl_weight * 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.2f s/step)", name, step, steps, loss.item(),
                     (time.monotonic() - t0) / (step + 1))


def train_vae(vae, seed, crop_steps, full_steps, lr=8e-4):
    ae = vae.first_stage_model
    ae.train()
    gen = torch.Generator().manual_seed(seed)
    train_autoencoder(ae, list(ae.parameters()), lambda s: shape_crops(seed, s * 32, 32), crop_steps, lr, gen,
                      "vae (32px crops)", kl_weight=1e-5)
    train_autoencoder(ae, list(ae.parameters()), lambda s: images(seed, 3_000_000 + s * 16, 16), full_steps,
                      lr / 2, gen, "vae (64px)", kl_weight=1e-5)
    ae.eval()


def focus_vae(vae, seed, crop_steps, full_steps, fg_weight, lr=4e-4):
    """More autoencoder training with the foreground-weighted loss, from the plain phase's weights."""
    ae = vae.first_stage_model
    ae.train()
    gen = torch.Generator().manual_seed(seed)
    train_autoencoder(ae, list(ae.parameters()), lambda s: shape_crops(seed, 7_000_000 + s * 32, 32), crop_steps,
                      lr, gen, "vae focus (32px crops)", kl_weight=1e-5, fg_weight=fg_weight)
    train_autoencoder(ae, list(ae.parameters()), lambda s: images(seed, 8_000_000 + s * 16, 16), full_steps,
                      lr / 2, gen, "vae focus (64px)", kl_weight=1e-5, fg_weight=fg_weight)
    ae.eval()


def finetune_decoder(vae, seed, steps, fg_weight, lr=3e-4):
    """Decoder-only training with the encoder frozen: sharper images, same latent space."""
    ae = vae.first_stage_model
    params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    ae.decoder.train()
    gen = torch.Generator().manual_seed(seed)
    train_autoencoder(ae, params, lambda s: images(seed, 5_000_000 + s * 16, 16), steps, lr, gen, "decoder",
                      fg_weight=fg_weight)
    ae.eval()


@torch.no_grad()
def reconstruction_accuracy(vae, n=256, seed=777):
    """The attribute classifier's accuracy on VAE reconstructions of ``n`` unseen images (a progress
    figure for the record; the teacher's own accuracy is measured by demo/measure_teacher.py)."""
    from demo import classifier

    net = classifier.load()
    ae = vae.first_stage_model
    scenes, recs = [], []
    for start in range(0, n, 64):
        items = [dataset.sample(seed, i) for i in range(start, min(n, start + 64))]
        x = torch.from_numpy(np.stack([im for im, _, _ in items]).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1)
        rec = ae.decoder(ae.post_quant_conv(posterior(ae, x)[0]))
        recs.append(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        scenes += [s for _, _, s in items]
    preds, _ = classifier.read(net, np.concatenate(recs))
    truth = classifier.labels(scenes)
    return {k: round(float((preds[k] == truth[k].numpy()).mean()), 4) for k in preds}


def train_unet_v2(model, clip, latents, stds, captions, seed, steps, work, lr=5e-4):
    """demo/train_teacher.py's UNet loop with a cosine lr and EMA snapshots every 500 steps in ``work``."""

    def snapshot(step, ema):
        if (step + 1) % 500 == 0 and step + 1 < steps:
            save(work / f"unet_ema_{step + 1}.safetensors", {**prefixed("unet.", ema["unet"]), **prefixed("clip.", ema["clip"])})

    train_unet(model, clip, latents, stds, captions, seed, steps, lr=lr,
               lr_at=lambda step: cosine_lr(step, steps, lr, warmup=200), on_step=snapshot)


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def unprefixed(prefix, sd):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def save(path, tensors):
    atomic_save_safetensors({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))


def load(path):
    import safetensors.torch

    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the phase that writes it first (see --help)")
    return safetensors.torch.load_file(str(path))


def write_record(work, phase, record):
    atomic_write_text(str(work / f"record_{phase}.json"), json.dumps(record, indent=1))


def run_phase(phase, args, demo_model, work):
    t0 = time.monotonic()
    record = {}
    if phase == "vae":
        _, _, vae = demo_model.build(None, seed=args.seed)
        train_vae(vae, args.seed + 1, args.vae_crop_steps, args.vae_steps)
        record["latent_scale_fold"] = fold_latent_scale(vae, args.seed + 1)
        record["vae_reconstruction_accuracy"] = reconstruction_accuracy(vae)
        save(work / "vae_base.safetensors", vae.first_stage_model.state_dict())
    elif phase == "vae_focus":
        vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae_base.safetensors"))
        focus_vae(vae, args.seed + 4, args.focus_crop_steps, args.focus_steps, args.fg_weight)
        record["latent_scale_fold_after_focus"] = fold_latent_scale(vae, args.seed + 1)
        record["vae_reconstruction_accuracy_after_focus"] = reconstruction_accuracy(vae)
        save(work / "vae.safetensors", vae.first_stage_model.state_dict())
    elif phase == "unet":
        model, clip, _ = demo_model.build(None, seed=args.seed)
        vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae.safetensors"))
        latents, stds, captions = encode_dataset(vae, args.seed, args.dataset_size)
        log.info("latents %s std %.3f", tuple(latents.shape), float(latents.std()))
        train_unet_v2(model, clip, latents, stds, captions, args.seed + 2, args.unet_steps, work)
        save(work / "unet.safetensors", {**prefixed("unet.", model.model.diffusion_model.state_dict()),
                                         **prefixed("clip.", clip.cond_stage_model.state_dict())})
    elif phase == "decoder":
        vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae.safetensors"))
        finetune_decoder(vae, args.seed + 3, args.decoder_steps, args.fg_weight)
        record["vae_reconstruction_accuracy_after_decoder"] = reconstruction_accuracy(vae)
        save(work / "vae_final.safetensors", vae.first_stage_model.state_dict())
    record.update({f"{phase}_minutes": round((time.monotonic() - t0) / 60, 1), "threads": torch.get_num_threads()})
    write_record(work, phase, record)
    log.info("phase %s done: %s", phase, record)


def assemble(args, demo_model, work):
    both = load(work / "unet.safetensors")
    model = demo_model.build_unet(demo_model.UNET_CONFIG, demo_model.NUM_HEADS, unprefixed("unet.", both))
    clip = demo_model.build_clip(demo_model.TEXT_CONFIG, unprefixed("clip.", both))
    vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae_final.safetensors"))
    record = {"seed": args.seed, "dataset_size": args.dataset_size, "vae_crop_steps": args.vae_crop_steps,
              "vae_steps": args.vae_steps, "focus_crop_steps": args.focus_crop_steps, "focus_steps": args.focus_steps,
              "fg_weight": args.fg_weight, "unet_steps": args.unet_steps, "decoder_steps": args.decoder_steps}
    for phase in PHASES:
        with open(work / f"record_{phase}.json") as f:
            record.update(json.load(f))
    record["minutes"] = round(sum(record.pop(f"{p}_minutes") for p in PHASES), 1)
    os.makedirs(args.out, exist_ok=True)
    for part, sd in demo_model.state_dicts(model, clip, vae).items():
        atomic_save_safetensors(sd, os.path.join(args.out, demo_model.FILES[part]), metadata={"tdd_demo": part})
    atomic_write_text(os.path.join(args.out, "teacher_train.json"), json.dumps(record, indent=1))
    log.info("demo weights written to %s: %s", args.out, record)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=("all", *PHASES, "assemble"), default="all")
    ap.add_argument("--vae-crop-steps", type=int, default=1600, help="VAE steps on 32x32 crops (batch 32)")
    ap.add_argument("--vae-steps", type=int, default=300, help="VAE steps on whole 64x64 images (batch 16)")
    ap.add_argument("--focus-crop-steps", type=int, default=800,
                    help="foreground-weighted VAE steps on 32x32 crops (batch 32)")
    ap.add_argument("--focus-steps", type=int, default=200, help="foreground-weighted VAE steps on 64x64 images")
    ap.add_argument("--fg-weight", type=float, default=10.0, help="loss weight of shape pixels (focus and decoder)")
    ap.add_argument("--unet-steps", type=int, default=2000, help="UNet + text encoder steps (batch 64)")
    ap.add_argument("--dataset-size", type=int, default=20000, help="images encoded for the UNet phase")
    ap.add_argument("--decoder-steps", type=int, default=300, help="decoder-only steps (batch 16)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared machine; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(REPO / ".host" / "teacher_work"))
    ap.add_argument("--out", default=str(REPO / ".host" / "teacher_v2"),
                    help="where assemble writes the three weight files (a folder for --weights of "
                         "demo/measure_teacher.py; copy them to demo/weights to ship them)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_host("cpu")
    demo_model = load_demo_module()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for phase in PHASES if args.phase == "all" else (() if args.phase == "assemble" else (args.phase,)):
        run_phase(phase, args, demo_model, work)
    if args.phase in ("all", "assemble"):
        assemble(args, demo_model, work)


if __name__ == "__main__":
    main()
