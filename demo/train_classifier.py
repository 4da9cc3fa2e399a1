"""Train the demo domain's attribute classifier (demo/classifier.py), the quality bench's instrument.

    .venv/bin/python demo/train_classifier.py [--steps 800] [--seed 0]

Seeded end to end. Training images come from ``demo/dataset.py`` with seed ``--seed + 100``, held-out
images from seed ``--seed + 200`` (never seen in training, nor by the demo model, which trains on
seed 0). Mild blur and noise augmentation make it read soft generated images as it reads crisp real
ones, without teaching it to confuse neighbouring colours (no colour jitter). It refuses to save
unless every attribute reaches ``--min-accuracy`` on the held-out images. Weights:
demo/instrument/attribute_net.safetensors (fp32), with the held-out accuracies in its metadata.
"""
from __future__ import annotations

import argparse
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
from demo import classifier, dataset  # noqa: E402

log = logging.getLogger("demo.train_classifier")


def scenes_and_images(seed: int, start: int, n: int):
    items = [dataset.sample(seed, i) for i in range(start, start + n)]
    return np.stack([img for img, _, _ in items]), [scene for _, _, scene in items]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: a 3x3 box blur mixed in with a random weight in [0, 0.6], then N(0, 0.03) noise."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(len(x), 1, 1, 1, generator=gen) * 0.6
    return x * (1 - w) + blurred * w + 0.03 * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def accuracy(net, images, scenes) -> dict[str, float]:
    preds, _ = classifier.read(net, images)
    truth = classifier.labels(scenes)
    return {name: float((preds[name] == truth[name].numpy()).mean()) for name in classifier.ATTRIBUTES}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-images", type=int, default=16000)
    ap.add_argument("--heldout-images", type=int, default=4000)
    ap.add_argument("--min-accuracy", type=float, default=0.98)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=classifier.WEIGHTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    train_imgs, train_scenes = scenes_and_images(args.seed + 100, 0, args.train_images)
    x_all = classifier.to_input(train_imgs)
    y_all = classifier.labels(train_scenes)
    held_imgs, held_scenes = scenes_and_images(args.seed + 200, 0, args.heldout_images)
    net = classifier.AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    net.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (args.batch,), generator=gen)
        logits = net(augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in classifier.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d loss %.4f (%.2f s/step)", step, loss.item(), (time.monotonic() - t0) / (step + 1))
    net.eval()
    acc = accuracy(net, held_imgs, held_scenes)
    log.info("held-out accuracy: %s", json.dumps(acc))
    worst = min(acc, key=acc.get)
    if acc[worst] < args.min_accuracy:
        log.error("'%s' reaches only %.4f < --min-accuracy %.2f on held-out images: not saved; train longer "
                  "(--steps) or with more images", worst, acc[worst], args.min_accuracy)
        return 1
    from trainer.lora_format import atomic_save_safetensors

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"heldout_accuracy": json.dumps(acc), "heldout_images": str(args.heldout_images), "seed": str(args.seed),
            "steps": str(args.steps), "minutes": f"{(time.monotonic() - t0) / 60:.1f}"}
    atomic_save_safetensors(net.state_dict(), args.out, metadata=meta)
    log.info("saved %s (%s)", args.out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
