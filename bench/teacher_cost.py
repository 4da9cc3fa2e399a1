#!/usr/bin/env python
"""What ``make demo-model`` costs on this machine, and which schedule of demo/train_teacher.py's phases is
fastest, measured side by side in one run.

    .venv/bin/python bench/teacher_cost.py [--steps 12]

The teacher's recipe is a handful of training-step kinds repeated thousands of times (the counts are
demo/train_teacher.py's defaults, the shipped recipe): VAE steps on 32x32 crops and on whole images
(phases ``vae`` and ``vae_focus``), UNet + text encoder steps (``unet``, ``unet_more``: 8,000 of them)
and decoder-only steps (``decoder``), plus encoding the UNet's 20,000 training images (once per UNet
process). Each kind is timed in a child process running the real step code (demo/train_teacher.py's
own functions) for ``--steps`` steps after a warm-up:

* alone at 2 threads and alone at 1 thread;
* side by side: the UNet at 1 thread and the decoder at 1 thread in two processes at once (the two
  cores shared as the parallel schedule shares them).

It then projects the whole recipe under two schedules and prints their ratio:

* ``serial x2``: every phase one after the other at ``--threads 2`` (``--phase all``);
* ``parallel x1``: the VAE phases at 2 threads, then the UNet phases (1 thread) and the decoder
  phase (1 thread) at once in two processes, as the shipped weights were made (the record
  demo/weights/teacher_train.json names each phase's threads; float sums, so the weights, depend on
  them).

Projections leave out what costs seconds (checkpoints, the classifier's progress figures). The
machine is shared: numbers move from run to run, the ratios less.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # demo/ and trainer/, imported where used (the children load ComfyUI)
KINDS = ("vae_crop", "vae_full", "unet", "decoder", "encode")
log = logging.getLogger("bench.teacher_cost")


def recipe_counts(args) -> dict[str, dict[str, int]]:
    """Steps of each kind per phase in the recipe of ``args`` (demo/train_teacher.py's options).
    ``encode`` counts 64-image batches: the dataset is encoded once by each UNet process."""
    unet = args.unet_steps + args.unet_more_cycles * args.unet_more_steps
    return {
        "vae": {"vae_crop": args.vae_crop_steps, "vae_full": args.vae_steps},
        "vae_focus": {"vae_crop": args.focus_crop_steps, "vae_full": args.focus_steps},
        "unet": {"unet": unet, "encode": 2 * -(-args.dataset_size // 64)},  # phases unet and unet_more
        "decoder": {"decoder": args.decoder_steps + args.decoder_dark_steps},
    }


def phase_seconds(counts: dict[str, int], per_step: dict[str, float]) -> float:
    return sum(n * per_step[kind] for kind, n in counts.items())


def project(counts: dict[str, dict[str, int]], alone2: dict, alone1: dict, side: dict) -> dict[str, float]:
    """Wall seconds of the recipe under each schedule from seconds per step of each kind: ``alone2`` /
    ``alone1`` measured alone at 2 / 1 threads, ``side`` with the UNet and decoder side by side."""
    vae = phase_seconds(counts["vae"], alone2) + phase_seconds(counts["vae_focus"], alone2)
    serial = vae + phase_seconds(counts["unet"], alone2) + phase_seconds(counts["decoder"], alone2)
    decoder = phase_seconds(counts["decoder"], side)
    unet_side = phase_seconds(counts["unet"], side)
    # The UNet shares the cores while the decoder runs, then has the machine to itself at 1 thread.
    if unet_side <= decoder:
        unet = unet_side
    else:
        unet = decoder + (unet_side - decoder) * alone1["unet"] / side["unet"]
    return {"serial x2": serial, "parallel x1": vae + max(unet, decoder)}


# --- the child process: seconds per step of one kind ------------------------------------------------

def time_kind(kind: str, steps: int) -> float:
    import torch

    from demo import train_teacher as tt
    from trainer.models import ensure_host

    ensure_host("cpu")
    demo_model = tt.load_demo_module()
    model, clip, vae = demo_model.build(None, seed=0)
    ae = vae.first_stage_model
    gen = torch.Generator().manual_seed(0)
    if kind == "encode":
        def run(n):
            tt.encode_dataset(vae, 0, 64 * n)
    elif kind == "unet":
        latents, stds, captions = tt.encode_dataset(vae, 0, 256)

        def run(n):
            tt.train_unet(model, clip, latents, stds, captions, 0, n)
    else:
        if kind == "decoder":
            params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
            batches, kl = (lambda s: tt.images(0, s * 16, 16)), None
        else:
            params = list(ae.parameters())
            kl = 1e-5
            batches = (lambda s: tt.shape_crops(0, s * 32, 32)) if kind == "vae_crop" else \
                (lambda s: tt.images(0, s * 16, 16))

        def run(n):
            tt.train_autoencoder(ae, params, batches, n, 1e-4, gen, kind, kl_weight=kl, fg_weight=10.0)
    run(2)  # warm-up: allocator, first-call dispatch
    t0 = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t0) / steps


def child(kind: str, threads: int, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", kind, "--threads", str(threads), "--steps", str(steps)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def result(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a timing child failed (exit {proc.returncode}); run it alone to see why: {proc.args}")
    return json.loads(out.strip().splitlines()[-1])["seconds_per_step"]


def measure(steps: int) -> tuple[dict, dict, dict]:
    alone2 = {k: result(child(k, 2, steps)) for k in KINDS}
    alone1 = {k: result(child(k, 1, steps)) for k in ("unet", "decoder", "encode")}
    pair = [child("unet", 1, steps), child("decoder", 1, steps)]
    side = dict(zip(("unet", "decoder"), map(result, pair)))
    return alone2, alone1, {**alone2, "encode": alone1["encode"], **side}  # encoding: at 1 thread, its own


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each kind (after 2 warm-up steps)")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps({"seconds_per_step": time_kind(args.child, args.steps)}))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from demo import train_teacher as tt

    counts = recipe_counts(tt.parser().parse_args([]))
    alone2, alone1, side = measure(args.steps)
    lines = ["| step kind | s/step alone, 2 threads | alone, 1 thread | side by side, 1 thread each |",
             "|---|---|---|---|"]
    for k in KINDS:
        one, both = (f"{alone1[k]:.3f}", f"{side[k]:.3f}") if k in alone1 else ("-", "-")
        lines.append(f"| {k} | {alone2[k]:.3f} | {one} | {both} |")
    wall = project(counts, alone2, alone1, side)
    lines += ["", "| schedule | projected wall time |", "|---|---|"]
    lines += [f"| {name} | {sec / 3600:.2f} h |" for name, sec in wall.items()]
    lines += ["", f"parallel x1 / serial x2 wall time: {wall['parallel x1'] / wall['serial x2']:.2f}",
              f"UNet step, 2 threads vs 1 thread alone: {alone1['unet'] / alone2['unet']:.2f}x faster"]
    log.info("demo teacher recipe %s\n%s", json.dumps(counts), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
