"""Measure the demo teacher with the attribute classifier: how often its samples show what the prompt asks.

    .venv/bin/python demo/measure_teacher.py [--samples 512] [--weights demo/weights] [--json F] [--grid F.png]

Fresh scenes (dataset seed 777, never trained on) as prompts, each with its own initial noise; the
teacher samples through the real ComfyUI host in this process as a user wires it (BasicScheduler
``normal``, ``euler``, CFGGuider 4.5, 25 steps, SamplerCustomAdvanced, VAEDecode). Every image is
read by ``demo/classifier.py``; so are the VAE's reconstructions of the scenes' real images (what
the decoder can show at best). Accuracy per attribute with bootstrap 95% intervals
(``bench/quality_metrics.py``), logged as a table; ``--json`` writes the figures, ``--grid`` a PNG of
real / VAE reconstruction / teacher sample rows. The figures in docs/demo_model.md come from here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread: fastest on shared cores (see bench/quality.py)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import quality  # noqa: E402  (bench/quality.py: the in-process host and its sampling recipes)
import quality_metrics as qm  # noqa: E402
from demo import classifier, dataset  # noqa: E402

log = logging.getLogger("demo.measure_teacher")
SCENE_SEED = 777


def scenes_and_images(n: int):
    items = [dataset.sample(SCENE_SEED, i) for i in range(n)]
    return [s for _, _, s in items], np.stack([im for im, _, _ in items])


def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """The VAE's encode -> decode of uint8 NHWC images, through the host's VAE object."""
    import torch

    with torch.inference_mode():
        pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
        decoded = vae.decode(vae.encode(pixels))
    return np.clip(255.0 * decoded.cpu().numpy(), 0, 255).round().astype(np.uint8)


def accuracy(net, images: np.ndarray, scenes) -> dict[str, qm.Estimate]:
    preds, _ = classifier.read(net, images)
    hits = qm.attribute_hits(preds, {k: v.numpy() for k, v in classifier.labels(scenes).items()})
    out = {name: qm.bootstrap_ci(h) for name, h in hits.items()}
    out["mean"] = qm.bootstrap_ci(qm.mean_hits(hits))
    return out


def save_grid(path: Path, rows: list[np.ndarray], columns: int = 16) -> None:
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r[:columns]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def use_weights(host, weights: Path) -> None:
    """Point ``host`` (a ``bench/quality.py`` Host) at other demo weight files: same classes."""
    demo_model = sys.modules[host.harness.pack_module().__name__ + ".nodes.demo_model"]
    host.model, host.clip, host.vae = demo_model.build(str(weights))
    host.empty = host.run("CLIPTextEncode", clip=host.clip, text="")[0]


def measure(host, samples: int, steps: int = 25, cfg: float = quality.TEACHER_CFG, chunk: int = 128) -> dict:
    """-> {"figures": {row label: {attribute: Estimate}}, "images": {row label: uint8 NHWC}, "seconds": float}
    for the real images, their VAE reconstructions and the teacher's samples of ``samples`` fresh scenes."""
    scenes, real = scenes_and_images(samples)
    net = classifier.load()
    start = time.perf_counter()
    conds = [host.encode([s.caption for s in scenes[i:i + chunk]]) for i in range(0, samples, chunk)]
    teacher = host.generate("teacher", host.model, steps, conds, guidance=cfg)
    seconds = time.perf_counter() - start
    images = {"real images": real, "VAE reconstruction": reconstruct(host.vae, real),
              f"teacher, {steps} euler steps, CFG {cfg:g}": teacher}
    return {"figures": {label: accuracy(net, im, scenes) for label, im in images.items()}, "images": images,
            "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=quality.TEACHER_CFG)
    ap.add_argument("--weights", default=str(REPO / "demo" / "weights"),
                    help="a folder with the three demo weight files (default: the shipped ones)")
    ap.add_argument("--chunk", type=int, default=128, help="images per sampling batch")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--grid", help="write a PNG of real / reconstruction / teacher rows here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.samples < 1:
        ap.error("--samples must be at least 1")
    host = quality.Host()
    weights = Path(args.weights).resolve()
    if weights != (REPO / "demo" / "weights").resolve():
        use_weights(host, weights)
    result = measure(host, args.samples, args.steps, args.cfg, args.chunk)
    names = list(classifier.ATTRIBUTES) + ["mean"]
    log.info("%d fresh scenes (dataset seed %d); accuracy %% [bootstrap 95%% interval]", args.samples, SCENE_SEED)
    log.info("| images | %s |", " | ".join(names))
    for label, acc in result["figures"].items():
        log.info("| %s | %s |", label, " | ".join(f"{100 * acc[n].value:.1f} ({100 * acc[n].lo:.1f}-{100 * acc[n].hi:.1f})"
                                                   for n in names))
    log.info("sampling took %.0f s", result["seconds"])
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"samples": args.samples, "scene_seed": SCENE_SEED, "steps": args.steps, "cfg": args.cfg,
             "weights": os.path.relpath(weights, REPO), "sampling_seconds": round(result["seconds"], 1),
             "accuracy": {label: {n: [round(e.value, 4), round(e.lo, 4), round(e.hi, 4)] for n, e in acc.items()}
                          for label, acc in result["figures"].items()}}, indent=1))
    if args.grid:
        save_grid(Path(args.grid), list(result["images"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
