"""Which part of a method's result comes from its training and which from its sampler: every student
of ``bench/quality.py`` sampled with every method's recipe, at one step count.

    .venv/bin/python bench/quality_cross.py [--preset small] [--steps 4]

Uses the students ``bench/quality.py`` trained for the preset (cached by their training settings and
the teacher; trained first if missing), the same prompts, initial noises, host and classifier, and
prints a table of mean prompt-adherence accuracy (and per attribute) with 95% bootstrap intervals:
rows are students, columns the sampling recipe. A figure for the investigation in docs/quality*.md,
not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (sets the one-thread environment before torch loads)

log = logging.getLogger("bench.quality_cross")
RECIPES = ("tdd", "tcd", "lcm")


def cross_scores(sample, students: dict, labels: dict, net, n_boot: int) -> list[tuple[str, str, dict]]:
    """``(student, recipe, accuracies)`` for every student and recipe: ``sample(recipe, model)`` gives the
    images of the prompts whose classifier ``labels`` are given; accuracies per attribute and their
    mean, each a bootstrap estimate."""
    rows = []
    for label, model in students.items():
        for recipe in RECIPES:
            cis, _ = quality.accuracy(net, sample(recipe, model), labels, n_boot)
            rows.append((label, recipe, cis))
            log.info("%s student, %s recipe: mean %s", label, recipe, quality.pct(cis["mean"]))
    return rows


def table(rows) -> str:
    attrs = [k for k in rows[0][2] if k != "mean"]
    lines = ["| student | sampled with | mean | " + " | ".join(attrs) + " |", "|---|---|---|" + "---|" * len(attrs)]
    lines += [f"| {label} | {recipe} | {quality.pct(c['mean'])} | " + " | ".join(quality.pct(c[a]) for a in attrs) + " |"
              for label, recipe, c in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(quality.PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples", type=int, help="override the preset's number of evaluation prompts")
    ap.add_argument("--train-steps", type=int, help="override the preset's training steps (a budget study)")
    ap.add_argument("--methods", default=",".join(RECIPES), help="students to compare, comma-separated")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from demo import classifier

    torch.set_num_threads(1)
    preset = quality.PRESETS[args.preset]
    if args.train_steps:
        preset = dataclasses.replace(preset, train_steps=args.train_steps)
    n = args.samples or preset.samples
    host = quality.Host()
    data = quality.write_data(preset)
    prompts = quality.eval_prompts(n)
    chunks = host.encode_chunks(prompts.captions, preset.chunk)
    students = {s.label: host.with_lora(quality.train_student(s, preset, data)[0])
                for s in quality.available_students() if s.name in args.methods.split(",")}
    labels = {k: v.numpy() for k, v in classifier.labels(prompts.scenes).items()}
    rows = cross_scores(lambda recipe, model: host.generate(recipe, model, args.steps, chunks), students, labels,
                        classifier.load(), preset.n_boot)
    log.info("%d prompts, %d steps, preset %s: accuracy %% [95%% bootstrap interval]\n%s", n, args.steps, args.preset,
             table(rows))


if __name__ == "__main__":
    main()
