"""Loss-target noise from the frozen base's precision, on the demo model (committed teacher weights).

    .venv/bin/python bench/target_noise.py [--batch 16]

For one fixed batch and fixed draws (docs/method.md §5), computes the training target (teacher DDIM
step + online student target at s) under three settings and prints the RMS difference of each from the
fp32 reference, next to the pseudo-Huber c = 1e-3 and the RMS of (prediction - target) at step 0:

- fp32 weights, fp32 compute (the reference target, exact);
- fp32 weights under bf16 autocast (the trainer's GPU default where bf16 exists);
- bf16 weights in fp32 compute (the weight rounding alone);
- bf16 weights under bf16 autocast (the old default / the memory-saving --base-dtype bf16).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.algorithm import StepConfig, TargetSampler, draw_batch, prediction_and_target  # noqa: E402
from trainer.fileio import load_module  # noqa: E402
from trainer.models import ensure_host, from_components  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ensure_host("cpu")
    from demo import dataset

    demo_model = load_module(REPO / "nodes" / "demo_model.py", "tdd_demo_model_bench")
    model, clip, vae = demo_model.load_demo()[:3]
    imgs, captions = [], []
    for i in range(args.batch):
        img, cap, _ = dataset.sample(0, i)
        imgs.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
        captions.append(cap)
    fp32 = from_components(model, clip, vae)
    x0 = fp32.encode_images(torch.stack(imgs))
    ctx, _ = fp32.encode_text(captions)
    ctx_e, _ = fp32.encode_text([""])
    cond, uncond = fp32.make_cond(ctx, None, 64, 64), fp32.make_cond(ctx_e.expand(args.batch, -1, -1), None, 64, 64)
    draws = draw_batch(TargetSampler("tdd"), 0, range(args.batch), tuple(x0.shape[1:]), 0.0)
    sched, step_cfg = fp32.schedule(None) if hasattr(fp32, "schedule") else None, StepConfig()
    if sched is None:
        from trainer.algorithm import DiscreteSchedule
        sched = DiscreteSchedule(fp32.sigmas)

    def target(teacher, autocast: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pred, tgt = prediction_and_target(teacher.x0, teacher.x0, x0, cond, uncond, draws, sched, step_cfg)
        return pred.float(), tgt.float()

    pred_ref, ref = target(fp32, False)
    # bf16 storage, emulated by rounding every weight to bf16 (stored back in fp32): under bf16 autocast the
    # matmuls/convs see exactly the bf16 weights, and the fp32 ops (norms) the rounded values, as with the
    # host's cast of a bf16 base (a bf16 module under CPU autocast fails in group_norm's dtype check).
    bf16_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in bf16_model.model.parameters():
            p.copy_(p.bfloat16().float())
    bf16 = from_components(bf16_model, clip, vae)
    rows = [("fp32 weights, bf16 autocast", target(fp32, True)[1]), ("bf16 weights, fp32 compute", target(bf16, False)[1]),
            ("bf16 weights, bf16 autocast", target(bf16, True)[1])]
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    print(f"batch {args.batch}, demo teacher, 64 px; pseudo-Huber c = 1e-3; "
          f"RMS(prediction - target) at step 0 (fp32): {rms(pred_ref - ref):.2e}")
    for name, t in rows:
        print(f"{name:30s} RMS target error vs fp32: {rms(t - ref):.2e}  ({rms(t - ref) / 1e-3:.1f} x c)")


if __name__ == "__main__":
    main()
