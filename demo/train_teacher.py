"""Train the embedded demo model (VAE, UNet + text encoder, VAE decoder) on the procedural shapes
dataset: the recipe of the shipped weights in demo/weights (``make demo-model`` runs the phases with
demo/build_teacher.sh: about 3.6 hours on 2 idle cores, bench/teacher_cost.py). Model card and
measurements: docs/demo_model.md.

    .venv/bin/python demo/train_teacher.py [--phase all|vae|vae_focus|unet|unet_more|decoder|assemble] [--threads 1]

Seeded phases, each reading and writing fp32 state in ``--work`` (default ``.host/teacher_work``):

1. ``vae``: the autoencoder, first on 32x32 crops around the shape (4x cheaper per image, and every
   crop holds the shape), then on whole 64x64 images; L1 + MSE + an edge loss, cosine lr. Its latent
   scale is folded into the weights so that ``latent * 0.18215`` has unit std, as SD1.5's.
2. ``vae_focus``: more of the same with the loss weighted ``--fg-weight`` times on the shape's region
   (:func:`foreground_weight`): without it the colours wash out towards the background.
3. ``unet``: the UNet with the text encoder on the VAE's latents (a fresh posterior sample per step),
   eps-prediction on the SD1.5 schedule, 10% empty prompts for classifier-free guidance, cosine lr
   and an EMA of the weights (saved every 500 steps to ``--work`` as ``unet_ema_<step>.safetensors``).
4. ``unet_more``: more cosine cycles (warm restarts, two by default), each from the previous one's
   EMA weights, with fresh batches: the first cycle's 2,000 steps were far from enough
   (docs/demo_model.md), and cycles let the training be split across sessions on a shared machine
   (a cycle whose weights are in ``--work`` already is skipped).
5. ``decoder``: the VAE decoder alone with the encoder frozen, so the latent space the UNet learnt
   stays valid: first with the shape-weighted loss, then longer with the images on the dark
   background weighted more (:func:`dark_weight`: there the shapes decoded dim, and colours were
   misread). It needs only phase 2, so it may run beside phases 3-4 (another process, another core).
6. ``assemble``: the three weight sets into ``--out`` (default ``.host/demo_teacher``; ``make demo-model``
   writes demo/weights) as fp16 safetensors, with the merged training record ``teacher_train.json``.

Every random draw comes from the phase's own generator, so a phase's result does not depend on
which phases ran before it in the same process (bit-identical at the same ``--threads``; the record
names the threads each phase ran with). Each VAE phase logs the attribute classifier's accuracy on
VAE reconstructions; the teacher's own is measured by demo/measure_teacher.py.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
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
from trainer.fileio import atomic_write_text  # noqa: E402
from trainer.lora_format import atomic_save_safetensors  # noqa: E402
from trainer.models import ensure_host  # noqa: E402

log = logging.getLogger("demo.train_teacher")
LATENT_SCALE = 0.18215  # SD1.5's latent format, which the host applies to this model
EMPTY_PROMPT_PROB = 0.1
PHASES = ("vae", "vae_focus", "unet", "unet_more", "decoder")


def load_demo_module():
    spec = importlib.util.spec_from_file_location("tdd_demo_model", REPO / "nodes" / "demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(seed, start, n):
    return torch.from_numpy(dataset.batch(seed, start, n)[0])


@torch.no_grad()
def fold_latent_scale(vae, seed, n=256):
    """Scale the VAE's latent so that latent * 0.18215 has unit std (as SD1.5's does)."""
    ae = vae.first_stage_model
    mean = posterior(ae, images(seed, 10_000_000, n))[0]
    k = 1.0 / (LATENT_SCALE * float(mean.std()))
    half = ae.quant_conv.out_channels // 2
    ae.quant_conv.weight[:half] *= k
    ae.quant_conv.bias[:half] *= k
    ae.quant_conv.bias[half:] += 2 * np.log(k)
    ae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def encode_dataset(vae, seed, n, batch=64):
    ae = vae.first_stage_model
    means, stds, caps = [], [], []
    for start in range(0, n, batch):
        arr, captions = dataset.batch(seed, start, min(batch, n - start))
        mean, logvar = posterior(ae, torch.from_numpy(arr))
        means.append(mean * LATENT_SCALE)
        stds.append((0.5 * logvar).exp() * LATENT_SCALE)
        caps += captions
    return torch.cat(means), torch.cat(stds), caps


def token_ids(clip, texts):
    return [[t for t, _ in clip.tokenizer.tokenize_with_weights(text)["l"][0]] for text in texts]


def train_unet(model, clip, latents, stds, captions, seed, steps, batch=64, lr=3e-4, ema_decay=0.998, lr_at=None,
               on_step=None):
    """The UNet + text encoder on encoded latents with an EMA of both (loaded at the end).

    ``lr_at(step)`` overrides the learning rate (default: ``lr`` after a 200-step linear warm-up);
    ``on_step(step, ema)`` is called after each step (e.g. to save EMA snapshots)."""
    unet = model.model.diffusion_model
    text = clip.cond_stage_model.clip_l
    abar = 1.0 / (1.0 + model.model.model_sampling.sigmas.float() ** 2)  # sigma^2 = (1 - abar) / abar
    params = list(unet.parameters()) + list(text.parameters())
    # The UNet trains; ComfyUI 0.33's BaseModel builds it frozen (0.3.x left it trainable). The text encoder
    # stays as the host builds it on every version, frozen (SDClipModel.freeze), so AdamW skips its weights.
    unet.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = {"unet": copy.deepcopy(unet.state_dict()), "clip": copy.deepcopy(clip.cond_stage_model.state_dict())}
    unet.train()
    text.train()
    g = torch.Generator().manual_seed(seed)
    all_ids = token_ids(clip, captions)
    empty_ids = token_ids(clip, [""])[0]
    t0 = time.monotonic()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=g)
        ids = [empty_ids if torch.rand((), generator=g) < EMPTY_PROMPT_PROB else all_ids[i] for i in idx.tolist()]
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        context = text(ids)[0]
        eps = unet(a * x0 + s * noise, timesteps=t.float(), context=context)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        step_lr = lr * min(1.0, (step + 1) / 200) if lr_at is None else lr_at(step)
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for name, module in (("unet", unet), ("clip", clip.cond_stage_model)):
                for k, v in module.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[name][k].mul_(decay).add_(v, alpha=1 - decay)
        if step % 50 == 0:
            log.info("unet step %d loss %.4f (%.2f s/step)", step, loss.item(), (time.monotonic() - t0) / (step + 1))
        if on_step is not None:
            on_step(step, ema)
    unet.load_state_dict(ema["unet"])
    clip.cond_stage_model.load_state_dict(ema["clip"])
    unet.eval()
    text.eval()
    return steps


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


def dark_weight(x, weight):
    """Per-image loss weight: ``weight`` for images on a dark background (median pixel below mid-grey),
    1 for the others. The autoencoder's colour errors are mostly on the dark background
    (docs/demo_model.md), where shapes decode dim."""
    dark = x.flatten(1).median(dim=1).values < 0
    return torch.where(dark, float(weight), 1.0)[:, None, None, None]


def image_loss(rec, x, fg_weight=1, dark=1):
    """L1 + 0.5 MSE + an edge loss (L1 on the images' horizontal and vertical finite differences, which
    keeps corners, stripes, checks and outlines crisp), each weighted by :func:`foreground_weight`
    and :func:`dark_weight`."""
    w = foreground_weight(x, fg_weight) * dark_weight(x, dark)
    d = rec - x
    dx, dy = d[..., :, 1:] - d[..., :, :-1], d[..., 1:, :] - d[..., :-1, :]
    return ((d.abs() + 0.5 * d ** 2) * w).mean() + (dx.abs() * w[..., :, 1:]).mean() + (dy.abs() * w[..., 1:, :]).mean()


def posterior(ae, x):
    mean, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


def train_autoencoder(ae, params, batches, steps, lr, gen, name, kl_weight=None, fg_weight=1, latent_noise=0.0,
                      dark=1):
    """AdamW over ``params`` on ``batches(step)``; the KL term only when the encoder trains; ``fg_weight``
    and ``dark`` weigh the loss (:func:`image_loss`).

    ``latent_noise`` > 0 perturbs each latent by Gaussian noise of std ``u * latent_noise`` times the
    latents' std (``u`` uniform in [0, 1) per image) before decoding: the decoder then learns to
    draw clean shapes from slightly-off latents, such as a diffusion model's samples."""
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
        if latent_noise:
            u = torch.rand((len(z), 1, 1, 1), generator=gen)
            z = z + u * latent_noise / LATENT_SCALE * torch.randn(z.shape, generator=gen)
        rec = ae.decoder(ae.post_quant_conv(z))
        loss = image_loss(rec, x, fg_weight, dark)
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


def finetune_decoder(vae, seed, steps, fg_weight, lr=3e-4, latent_noise=0.0, dark=1):
    """Decoder-only training with the encoder frozen: sharper images, same latent space."""
    ae = vae.first_stage_model
    params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    ae.decoder.train()
    gen = torch.Generator().manual_seed(seed)
    train_autoencoder(ae, params, lambda s: images(seed, 5_000_000 + s * 16, 16), steps, lr, gen, "decoder",
                      fg_weight=fg_weight, latent_noise=latent_noise, dark=dark)
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


def train_unet_cycle(model, clip, latents, stds, captions, seed, steps, work, lr=5e-4, name="unet"):
    """:func:`train_unet` with a cosine lr and EMA snapshots every 500 steps in ``work``
    (``<name>_ema_<step>.safetensors``)."""

    def snapshot(step, ema):
        if (step + 1) % 500 == 0 and step + 1 < steps:
            save(work / f"{name}_ema_{step + 1}.safetensors", {**prefixed("unet.", ema["unet"]), **prefixed("clip.", ema["clip"])})

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


def read_record(work, phase):
    path = work / f"record_{phase}.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the phase that writes it first (see --help)")
    return json.loads(path.read_text())


def unet_cycle_name(cycle):
    """The UNet weights' stem after ``cycle`` cycles of phase unet_more (0: the unet phase's)."""
    return "unet" if cycle == 0 else "unet_more" if cycle == 1 else f"unet_more_{cycle}"


def unet_data(args, demo_model, work):
    """The UNet phases' training set: the dataset encoded by the focused VAE (latents, stds, captions)."""
    vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae.safetensors"))
    latents, stds, captions = encode_dataset(vae, args.seed, args.dataset_size)
    log.info("latents %s std %.3f", tuple(latents.shape), float(latents.std()))
    return latents, stds, captions


def train_unet_phase(model, clip, data, work, steps, lr, seed, name):
    """One cosine cycle of UNet training on ``data`` (:func:`unet_data`), written to ``work/<name>.safetensors``."""
    train_unet_cycle(model, clip, *data, seed, steps, work, lr=lr, name=name)
    save(work / f"{name}.safetensors", {**prefixed("unet.", model.model.diffusion_model.state_dict()),
                                        **prefixed("clip.", clip.cond_stage_model.state_dict())})


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
        train_unet_phase(model, clip, unet_data(args, demo_model, work), work, args.unet_steps, args.unet_lr,
                         args.seed + 2, "unet")
    elif phase == "unet_more":  # warm restarts: each cycle from the previous one's (EMA) weights, fresh batches
        data = None  # encoded once, and only if a cycle is left to run
        for cycle in range(1, args.unet_more_cycles + 1):
            name = unet_cycle_name(cycle)
            if (work / f"{name}.safetensors").is_file():
                log.info("%s.safetensors is in %s already: cycle %d skipped", name, work, cycle)
                continue
            model, clip, _ = demo_model.build(None, seed=args.seed)
            both = load(work / f"{unet_cycle_name(cycle - 1)}.safetensors")
            model.model.diffusion_model.load_state_dict(unprefixed("unet.", both))
            clip.cond_stage_model.load_state_dict(unprefixed("clip.", both))
            if data is None:
                data = unet_data(args, demo_model, work)
            t1 = time.monotonic()
            train_unet_phase(model, clip, data, work, args.unet_more_steps, args.unet_more_lr,
                             args.seed + 2 + 100 * cycle, name)
            write_record(work, f"{name}_cycle", {"minutes": round((time.monotonic() - t1) / 60, 1),
                                                 "threads": torch.get_num_threads()})
        cycles = {unet_cycle_name(c): read_record(work, f"{unet_cycle_name(c)}_cycle")
                  for c in range(1, args.unet_more_cycles + 1)}
        record = {"unet_more_cycles_run": cycles, "unet_more_minutes": sum(v["minutes"] for v in cycles.values())}
    elif phase == "decoder":
        start = Path(args.decoder_init) if args.decoder_init else work / "vae.safetensors"
        vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(start))
        if args.decoder_init:
            record["decoder_init"] = str(args.decoder_init)
        finetune_decoder(vae, args.seed + 3 + (100 if args.decoder_init else 0), args.decoder_steps, args.fg_weight,
                         lr=args.decoder_lr, latent_noise=args.decoder_latent_noise)
        record["decoder_latent_noise"] = args.decoder_latent_noise
        if args.decoder_dark_steps:
            record["vae_reconstruction_accuracy_after_decoder_plain"] = reconstruction_accuracy(vae)
            finetune_decoder(vae, args.seed + 103, args.decoder_dark_steps, args.fg_weight, lr=args.decoder_lr,
                             dark=args.decoder_dark_weight)
        record["vae_reconstruction_accuracy_after_decoder"] = reconstruction_accuracy(vae)
        save(work / "vae_final.safetensors", vae.first_stage_model.state_dict())
    if phase != "unet_more":  # its minutes are the sum over its cycles, which may have run in several processes
        record.update({f"{phase}_minutes": round((time.monotonic() - t0) / 60, 1), "threads": torch.get_num_threads()})
    write_record(work, phase, record)
    log.info("phase %s done: %s", phase, record)


def assemble(args, demo_model, work):
    both = load(work / f"{unet_cycle_name(args.unet_more_cycles)}.safetensors")
    model = demo_model.build_unet(demo_model.UNET_CONFIG, demo_model.NUM_HEADS, unprefixed("unet.", both))
    clip = demo_model.build_clip(demo_model.TEXT_CONFIG, unprefixed("clip.", both))
    vae = demo_model.build_vae(demo_model.VAE_CONFIG, load(work / "vae_final.safetensors"))
    record = {"seed": args.seed, "dataset_size": args.dataset_size, "vae_crop_steps": args.vae_crop_steps,
              "vae_steps": args.vae_steps, "focus_crop_steps": args.focus_crop_steps, "focus_steps": args.focus_steps,
              "fg_weight": args.fg_weight, "unet_steps": args.unet_steps, "unet_lr": args.unet_lr,
              "unet_more_steps": args.unet_more_steps, "unet_more_lr": args.unet_more_lr,
              "unet_more_cycles": args.unet_more_cycles, "decoder_steps": args.decoder_steps,
              "decoder_dark_steps": args.decoder_dark_steps, "decoder_dark_weight": args.decoder_dark_weight}
    for phase in PHASES:
        phase_record = read_record(work, phase)
        if "threads" in phase_record:
            phase_record[f"{phase}_threads"] = phase_record.pop("threads")
        record.update(phase_record)
    record["minutes"] = round(sum(record.pop(f"{p}_minutes") for p in PHASES), 1)
    os.makedirs(args.out, exist_ok=True)
    for part, sd in demo_model.state_dicts(model, clip, vae).items():
        atomic_save_safetensors(sd, os.path.join(args.out, demo_model.FILES[part]), metadata={"tdd_demo": part})
    atomic_write_text(os.path.join(args.out, "teacher_train.json"), json.dumps(record, indent=1))
    log.info("demo weights written to %s: %s", args.out, record)


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped recipe (bench/teacher_cost.py reads them)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=("all", *PHASES, "assemble"), default="all")
    ap.add_argument("--vae-crop-steps", type=int, default=1600, help="VAE steps on 32x32 crops (batch 32)")
    ap.add_argument("--vae-steps", type=int, default=300, help="VAE steps on whole 64x64 images (batch 16)")
    ap.add_argument("--focus-crop-steps", type=int, default=800,
                    help="foreground-weighted VAE steps on 32x32 crops (batch 32)")
    ap.add_argument("--focus-steps", type=int, default=200, help="foreground-weighted VAE steps on 64x64 images")
    ap.add_argument("--fg-weight", type=float, default=10.0, help="loss weight of shape pixels (focus and decoder)")
    ap.add_argument("--unet-steps", type=int, default=2000, help="UNet + text encoder steps (batch 64)")
    ap.add_argument("--unet-lr", type=float, default=5e-4, help="peak learning rate of the unet phase (cosine)")
    ap.add_argument("--unet-more-steps", type=int, default=3000,
                    help="UNet steps of each cosine cycle of phase unet_more")
    ap.add_argument("--unet-more-lr", type=float, default=3e-4, help="peak learning rate of phase unet_more")
    ap.add_argument("--unet-more-cycles", type=int, default=2,
                    help="cosine cycles of phase unet_more, each from the previous one's EMA weights; a cycle "
                         "whose weights are in --work already is skipped, so more cycles resume a finished run")
    ap.add_argument("--dataset-size", type=int, default=20000, help="images encoded for the UNet phase")
    ap.add_argument("--decoder-steps", type=int, default=300, help="decoder-only steps, first stage (batch 16)")
    ap.add_argument("--decoder-lr", type=float, default=3e-4, help="peak learning rate of the decoder phase")
    ap.add_argument("--decoder-latent-noise", type=float, default=0.0,
                    help="decoder phase: perturb latents by up to this many latent stds of Gaussian noise")
    ap.add_argument("--decoder-dark-steps", type=int, default=2000,
                    help="decoder phase, second stage: steps (batch 16) with the dark-background images weighted "
                         "--decoder-dark-weight times, from the first stage's weights")
    ap.add_argument("--decoder-dark-weight", type=float, default=3.0,
                    help="loss weight of images on the dark background in the decoder's second stage")
    ap.add_argument("--decoder-init", default=None,
                    help="start the decoder phase from this VAE file (e.g. an earlier vae_final.safetensors; "
                         "its encoder must be the UNet's, i.e. vae.safetensors')")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared machine; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(REPO / ".host" / "teacher_work"))
    ap.add_argument("--out", default=str(REPO / ".host" / "demo_teacher"),
                    help="where assemble writes the three weight files (a folder for --weights of "
                         "demo/measure_teacher.py; copy them to demo/weights to ship them)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
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
