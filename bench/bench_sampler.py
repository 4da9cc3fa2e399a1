"""TDD Sampler overhead vs the host's stock samplers, and TDD Guidance evaluation counts.

Runs one SD1.5-configured host UNet (random weights; small latent) through the TDD sampler and the
host's ``lcm`` and ``euler`` samplers on the same sigmas (same number of model evaluations),
interleaved round by round so machine noise hits all alike, and prints wall-time ratios and each
sampler's own per-step overhead (wall time minus time inside the model). Target: TDD within 2% of
the stock samplers. Then counts model evaluations of TDD Guidance with and without its interval.

    .venv/bin/python bench/bench_sampler.py [--rounds 15] [--channels 64] [--latent 16]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import harness  # noqa: E402

log = logging.getLogger("bench")


def build_unet(channels: int, seed: int = 0):
    """An SD1.5-configured host UNet (768-d context, 8 heads) with ``channels`` base channels."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
                   "model_channels": channels, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 6 + [0] * 6,
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
                   "use_temporal_attention": False, "use_temporal_resblock": False}
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "model.", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def timed_model(model):
    """A clone whose UNet calls are timed and counted (one count per cond/uncond entry)."""
    patched, stats = model.clone(), {"seconds": 0.0, "evals": 0}

    def wrapper(apply_model, args):
        start = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        stats["seconds"] += time.perf_counter() - start
        stats["evals"] += len(args["cond_or_uncond"])
        return out

    patched.set_model_unet_function_wrapper(wrapper)
    return patched, stats


def conditioning(batch=1, tokens=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 768, generator=g), {}]]


def run_sampler(model, sampler, sigmas, latent, positive, negative, cfg=1.0, guider=None):
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    start = time.perf_counter()
    if guider is None:
        comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                   disable_pbar=True, seed=0)
    else:
        guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0)
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--channels", type=int, default=64, help="UNet base channels (SD1.5 uses 320)")
    ap.add_argument("--latent", type=int, default=16, help="latent side (16 = a 128 px image)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    base = tempfile.TemporaryDirectory(prefix="tdd_bench_")  # removed when the process ends
    nodes = harness.inprocess_host(base.name)
    import comfy.samplers

    pack = harness.pack_module()
    unet = build_unet(args.channels)
    model, stats = timed_model(unet)
    sigmas = pack.nodes._host.tdd_sigmas(model.get_model_object("model_sampling"), args.steps)
    latent = torch.zeros(1, 4, args.latent, args.latent)
    pos, neg = conditioning(seed=1), conditioning(seed=2)
    samplers = {"tdd": comfy.samplers.KSAMPLER(pack.nodes.sampler.sample_tdd, {"eta": 0.2}),
                "lcm": comfy.samplers.ksampler("lcm"), "euler": comfy.samplers.ksampler("euler")}

    run_sampler(model, samplers["euler"], sigmas, latent, pos, neg)  # warm-up
    wall = {k: [] for k in samplers}
    overhead = {k: [] for k in samplers}
    for _ in range(args.rounds):
        for name, sampler in samplers.items():
            stats.update(seconds=0.0, evals=0)
            t = run_sampler(model, sampler, sigmas, latent, pos, neg)
            assert stats["evals"] == args.steps, (name, stats)
            wall[name].append(t)
            overhead[name].append((t - stats["seconds"]) / args.steps * 1e3)
    forward_ms = statistics.median(wall["euler"]) / args.steps * 1e3
    log.info("model: SD1.5-configured host UNet, %d base channels, latent %dx%d; %d steps, %d rounds",
             args.channels, args.latent, args.latent, args.steps, args.rounds)
    log.info("median time per model forward (incl. host per-step work): %.1f ms", forward_ms)
    for name in samplers:
        log.info("%-6s median wall %.1f ms   sampler overhead per step %.3f ms", name,
                 statistics.median(wall[name]) * 1e3, statistics.median(overhead[name]))
    for ref in ("lcm", "euler"):
        ratios = [a / b for a, b in zip(wall["tdd"], wall[ref])]
        log.info("wall-time ratio tdd / %-5s median %.4f  (target <= 1.02)", ref, statistics.median(ratios))

    # TDD Guidance: model evaluations with and without the interval option
    for start, end in ((0.0, 1.0), (0.0, 0.5)):
        (guider,) = harness.run_node(nodes, "TDDGuidance", model=model, positive=pos, negative=neg, scale=1.7,
                                     guidance_start=start, guidance_end=end, rescale=0.0)
        stats.update(seconds=0.0, evals=0)
        t = run_sampler(model, samplers["tdd"], sigmas, latent, pos, neg, guider=guider)
        log.info("TDD Guidance interval [%.1f, %.1f): %d model evaluations for %d steps (%.0f ms)", start, end,
                 stats["evals"], args.steps, t * 1e3)


if __name__ == "__main__":
    main()
