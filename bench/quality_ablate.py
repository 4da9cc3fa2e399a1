"""Why a TDD student scores what it scores: TDD students trained with one setting changed at a time
(target window, stochastic shrink, learning rate), next to the LCM student, all with
``bench/quality.py``'s budget, prompts, noises, host and classifier.

    .venv/bin/python bench/quality_ablate.py [--preset small] [--steps 4] [--variants tdd,tdd_eta0,lcm]

Each variant is a ``bench/quality.py`` student with extra trainer flags, cached the same way (the
plain ``tdd`` and ``lcm`` variants are the bench's own students, so they are shared with it). Each
samples with its method's recipe; the table gives prompt-adherence accuracy per attribute and mean,
and the Frechet distance to real images, with 95% bootstrap intervals. A figure for the
investigation in docs/quality*.md, not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (sets the one-thread environment before torch loads)
import quality_metrics as qm  # noqa: E402

log = logging.getLogger("bench.quality_ablate")

#: name -> (label, trainer flags, sampling recipe). ``tdd`` and ``lcm`` are the bench's students.
VARIANTS = {
    "tdd": ("TDD (bench: eta_max 0.3, targets of 4-8 step grids, lr 2e-4)", ("--method", "tdd"), "tdd"),
    "tdd_eta0": ("TDD, no stochastic shrink (eta_max 0)", ("--method", "tdd", "--eta-max", "0"), "tdd"),
    "tdd_eta06": ("TDD, twice the shrink (eta_max 0.6)", ("--method", "tdd", "--eta-max", "0.6"), "tdd"),
    "tdd_k2_4": ("TDD, targets of 2-4 step grids", ("--method", "tdd", "--kmin", "2", "--kmax", "4"), "tdd"),
    "tdd_k8_16": ("TDD, targets of 8-16 step grids", ("--method", "tdd", "--kmin", "8", "--kmax", "16"), "tdd"),
    "tdd_lr1e-4": ("TDD, lr 1e-4", ("--method", "tdd", "--lr", "1e-4"), "tdd"),
    "tdd_lr4e-4": ("TDD, lr 4e-4", ("--method", "tdd", "--lr", "4e-4"), "tdd"),
    "lcm": ("LCM (bench)", ("--method", "lcm"), "lcm"),
}


def variant_student(name: str) -> quality.Student:
    if name not in VARIANTS:
        raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
    label, flags, recipe = VARIANTS[name]
    return quality.Student(name, label, flags, recipe)


def table(rows: list[tuple[str, int, dict]]) -> str:
    attrs = [k for k in rows[0][2] if k not in ("mean", "fd")]
    lines = ["| variant | steps | mean | " + " | ".join(attrs) + " | FD to real |",
             "|---|---|---|" + "---|" * len(attrs) + "---|"]
    lines += [f"| {label} | {steps} | {quality.pct(m['mean'])} | " + " | ".join(quality.pct(m[a]) for a in attrs)
              + f" | {quality.num(m['fd'], 1)} |" for label, steps, m in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(quality.PRESETS), default="small")
    ap.add_argument("--steps", default="4", help="sampling step counts, comma-separated")
    ap.add_argument("--samples", type=int, help="override the preset's number of evaluation prompts")
    ap.add_argument("--variants", default="tdd,tdd_eta0,tdd_eta06,tdd_k2_4,tdd_k8_16,tdd_lr1e-4,tdd_lr4e-4,lcm",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--train-only", action="store_true", help="train (or find cached) the variants, then stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    students = [variant_student(v.strip()) for v in args.variants.split(",") if v.strip()]
    steps = [int(s) for s in args.steps.split(",")]
    import torch

    from demo import classifier

    torch.set_num_threads(1)
    preset = quality.PRESETS[args.preset]
    if args.samples:
        preset = dataclasses.replace(preset, samples=args.samples)
    host = quality.Host()
    data = quality.write_data(preset)
    trained = {s: quality.train_student(s, preset, data) for s in students}
    for s, (_, rec) in trained.items():
        log.info("%s: %.1f min of training%s", s.label, rec["train_seconds"] / 60, " (cached)" if rec["cached"] else "")
    if args.train_only:
        return 0
    prompts = quality.eval_prompts(preset.samples)
    chunks = host.encode_chunks(prompts.captions, preset.chunk)
    net = classifier.load()
    labels = {k: v.numpy() for k, v in classifier.labels(prompts.scenes).items()}
    real_feats = quality.real_features(net, preset.samples)
    rows = []
    for s, (path, _) in trained.items():
        model = host.with_lora(path)
        for n in steps:
            metrics, feats = quality.accuracy(net, host.generate(s.recipe, model, n, chunks), labels, preset.n_boot)
            metrics["fd"] = qm.bootstrap_fd_ci(feats, real_feats, n_boot=preset.fd_boot, seed=0)
            rows.append((s.label, n, metrics))
            log.info("%s, %d steps: mean %s, FD %s", s.label, n, quality.pct(metrics["mean"]),
                     quality.num(metrics["fd"], 1))
    log.info("preset %s (%d x %d training, %d prompts): accuracy %% and FD [95%% bootstrap interval]\n%s",
             args.preset, preset.train_steps, preset.batch, preset.samples, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
