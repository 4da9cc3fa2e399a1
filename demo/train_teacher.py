"""Train the embedded demo model (VAE, then UNet + text encoder) on the procedural shapes dataset.

    .venv/bin/python demo/train_teacher.py [--vae-steps 900] [--unet-steps 4000] [--decoder-steps 800] [--seed 0]

Three seeded phases (about 10, 30 and 10 minutes on 2 CPU cores): the VAE, the UNet with the text
encoder on the VAE's latents, then the VAE decoder alone (encoder frozen, so the latent space the
UNet learnt stays valid). The weights land in demo/weights/ as
fp16 safetensors, with the training record in demo/weights/teacher_train.json. Model card:
docs/demo_model.md.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
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
from trainer.models import ensure_host  # noqa: E402

log = logging.getLogger("demo.train_teacher")
LATENT_SCALE = 0.18215  # SD1.5's latent format, which the host applies to this model
EMPTY_PROMPT_PROB = 0.1


def load_demo_module():
    spec = importlib.util.spec_from_file_location("tdd_demo_model", REPO / "nodes" / "demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(seed, start, n):
    return torch.from_numpy(dataset.batch(seed, start, n)[0])


def train_vae(vae, seed, steps, batch=16, lr=4e-4):
    ae = vae.first_stage_model
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.monotonic()
    for step in range(steps):
        x = images(seed, step * batch, batch)
        posterior = ae.encoder(x)
        posterior = ae.quant_conv(posterior)
        mean, logvar = posterior.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        rec = ae.decoder(ae.post_quant_conv(z))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log.info("vae step %d loss %.4f kl %.2f (%.1f s/step)", step, loss.item(), kl.item(),
                     (time.monotonic() - t0) / (step + 1))
    ae.eval()
    return steps


def finetune_decoder(vae, seed, steps, batch=16, lr=3e-4):
    """Decoder-only training with the encoder frozen: sharper images, same latent space (so the
    UNet and its LoRA stay valid)."""
    ae = vae.first_stage_model
    params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ae.decoder.train()
    t0 = time.monotonic()
    for step in range(steps):
        x = images(seed, 5_000_000 + step * batch, batch)
        with torch.no_grad():
            mean, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
            z = mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn_like(mean)
        rec = ae.decoder(ae.post_quant_conv(z))
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log.info("decoder step %d loss %.4f (%.1f s/step)", step, loss.item(), (time.monotonic() - t0) / (step + 1))
    ae.eval()
    return steps


@torch.no_grad()
def fold_latent_scale(vae, seed, n=256):
    """Scale the VAE's latent so that latent * 0.18215 has unit std (as SD1.5's does)."""
    ae = vae.first_stage_model
    mean = ae.quant_conv(ae.encoder(images(seed, 10_000_000, n))).chunk(2, dim=1)[0]
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
        mean, logvar = ae.quant_conv(ae.encoder(torch.from_numpy(arr))).chunk(2, dim=1)
        means.append(mean * LATENT_SCALE)
        stds.append((0.5 * logvar.clamp(-30, 20)).exp() * LATENT_SCALE)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae-steps", type=int, default=900)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--dataset-size", type=int, default=12000)
    ap.add_argument("--decoder-steps", type=int, default=800)
    ap.add_argument("--only-decoder", action="store_true",
                    help="load the weights in --out and run only the decoder phase (the last one)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "demo" / "weights"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    ensure_host("cpu")
    demo_model = load_demo_module()
    import safetensors.torch

    if args.threads:
        torch.set_num_threads(args.threads)
    record_path = os.path.join(args.out, "teacher_train.json")
    start = time.monotonic()
    if args.only_decoder:
        model, clip, vae = demo_model.build(args.out)
        with open(record_path) as f:
            record = json.load(f)
    else:
        model, clip, vae = demo_model.build(None, seed=args.seed)
        record = {"seed": args.seed, "dataset_size": args.dataset_size, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        record["vae_steps"] = train_vae(vae, args.seed + 1, args.vae_steps)
        record["latent_scale_fold"] = fold_latent_scale(vae, args.seed + 1)
        latents, stds, captions = encode_dataset(vae, args.seed, args.dataset_size)
        log.info("latents %s std %.3f", tuple(latents.shape), float(latents.std()))
        record["unet_steps"] = train_unet(model, clip, latents, stds, captions, args.seed + 2, args.unet_steps)
    record["decoder_steps"] = finetune_decoder(vae, args.seed + 3, args.decoder_steps)
    record["minutes"] = round(record.get("minutes", 0) + (time.monotonic() - start) / 60, 1)
    os.makedirs(args.out, exist_ok=True)
    for part, sd in demo_model.state_dicts(model, clip, vae).items():
        path = os.path.join(args.out, demo_model.FILES[part])
        safetensors.torch.save_file(sd, path + ".tmp", metadata={"tdd_demo": part})
        os.replace(path + ".tmp", path)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    log.info("done: %s", record)


if __name__ == "__main__":
    main()
