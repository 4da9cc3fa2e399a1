"""Which calibration criterion to trust, measured on the demo model; and what helps TDD at 2 steps.

Calibration (``trainer/calibrate.py``) must choose sampler settings on any model, so it cannot use a
classifier. On the demo model one exists (``demo/classifier.py``): it reads whether each image shows
what its prompt asked for. This bench samples a TDD student (default: the shipped demo LoRA) at
every (guidance, eta) of the calibration grid for the step counts given, with the calibration's
own sampler code (``Calibrator.sample``), and for each setting records

* the classifier's mean attribute accuracy over the prompts (the ground truth), and
* every candidate criterion of :data:`trainer.calibrate.CRITERIA` (distance to the teacher's
  25-step image from the same noise).

For each criterion and step count it then reports the setting the criterion chooses (by the
trainer's coordinate search over the same scores, and by the whole grid), the classifier's accuracy
there, the **regret** (best accuracy on the grid minus the accuracy at the choice; a paired bootstrap
interval over prompts), and the rank correlation of criterion and accuracy across the grid. The
criterion with the smallest mean regret of its coordinate-search choice is the one to keep.

``--two-step`` adds the 2-step study: the TDD recipe at 2 steps against variants within TDD's
method (eta 0, no guidance, x0 clipping at the first step, other second timesteps), with
classifier accuracy and its interval for each.

    python bench/calibration_criteria.py --prompts 128 --steps 2 4 8 --two-step
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import quality_metrics as qm  # noqa: E402

log = logging.getLogger("bench.calibration_criteria")

DEMO_LORA = REPO / "demo" / "loras" / "demo_tdd_lora.safetensors"
PROMPT_SEED = 1003      # fresh scenes: not the demo's training seeds, not the quality bench's evaluation ones
NOISE_SEED = 1004
TEACHER_CFG = 4.5       # the demo teacher's CFG, = 1 + the trainer's teacher guidance 3.5
FIXED = (1.7, 0.2)      # the TDD recipe's guidance and eta


def rankdata(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def spearman(a, b) -> float:
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1]) if np.std(ra) and np.std(rb) else float("nan")


def hits_of(net, pixels, labels) -> np.ndarray:
    """Per image: the fraction of the prompt's attributes the classifier reads back."""
    from demo import classifier

    images = np.clip(np.round(pixels.numpy() * 255.0), 0, 255).astype(np.uint8)
    preds, _ = classifier.read(net, images)
    return qm.mean_hits(qm.attribute_hits(preds, labels))


def measure_grid(cal, sweep, net, labels) -> dict:
    """{Setting.key(): {"hits": per-image hits, criterion: per-image values}} for every grid setting."""
    from trainer import calibrate

    ref = cal.reference()
    out = {}
    settings = [calibrate.Setting(k, g, e) for k in sweep.steps for g in sweep.guidances for e in sweep.etas]
    for n, s in enumerate(settings, 1):
        t0 = time.perf_counter()
        sample = cal.sample(s)
        row = {"hits": hits_of(net, sample.pixels, labels)}
        for name, fn in calibrate.CRITERIA.items():
            row[name] = fn(sample, ref).numpy()
        out[s.key()] = row
        log.info("[%d/%d] %s: accuracy %.1f%% (%.1f s)", n, len(settings), s, 100 * row["hits"].mean(),
                 time.perf_counter() - t0)
    return out


def paired_regret(best: np.ndarray, chosen: np.ndarray, n_boot: int) -> qm.Estimate:
    """Accuracy points lost by the choice, with a paired bootstrap interval over prompts."""
    return qm.bootstrap_ci(100.0 * (best - chosen), n_boot, seed=0)


def analyse(grid: dict, sweep, n_boot: int) -> tuple[list[dict], dict]:
    from trainer import calibrate

    rows, mean_regret = [], {}
    for name in calibrate.CRITERIA:
        regrets = []
        for k in sweep.steps:
            keys = [key for key in grid if key[0] == k]
            acc = {key: grid[key]["hits"].mean() for key in keys}
            crit = {key: float(grid[key][name].mean()) for key in keys}
            best = max(keys, key=lambda key: acc[key])
            by_grid = min(keys, key=lambda key: crit[key])
            best_coord, _ = calibrate.search(lambda s: crit[s.key()], calibrate.Sweep((k,), sweep.guidances,
                                                                                    sweep.etas), eta0=FIXED[1])
            by_coord = best_coord[k].key()
            regret = paired_regret(grid[best]["hits"], grid[by_coord]["hits"], n_boot)
            regrets.append(regret.value)
            rows.append({"criterion": name, "steps": k, "choice": by_coord, "grid_choice": by_grid,
                         "accuracy": qm.bootstrap_ci(100 * grid[by_coord]["hits"], n_boot, seed=0),
                         "best": best, "best_accuracy": qm.bootstrap_ci(100 * grid[best]["hits"], n_boot, seed=0),
                         "regret": regret,
                         "grid_regret": paired_regret(grid[best]["hits"], grid[by_grid]["hits"], n_boot).value,
                         "spearman": spearman([-crit[key] for key in keys], [acc[key] for key in keys])})
        mean_regret[name] = float(np.mean(regrets))
    return rows, mean_regret


def fixed_rows(grid: dict, sweep, n_boot: int) -> list[str]:
    lines = []
    for k in sweep.steps:
        key = (k, *FIXED)
        if key in grid:
            lines.append(f"| {k} | {FIXED[0]:g} / {FIXED[1]:g} | "
                         f"{est(qm.bootstrap_ci(100 * grid[key]['hits'], n_boot, seed=0))} |")
    return lines


def two_step_study(cal, net, labels, n_boot: int) -> list[tuple[str, qm.Estimate]]:
    """The TDD recipe at 2 steps and variants within TDD's method, on the same prompts and noises."""
    from tdd_core import tdd_timesteps

    recipe = tdd_timesteps(2)
    variants = [
        (f"TDD recipe: timesteps {recipe}, guidance 1.7, eta 0.2", recipe, 1.7, 0.2, 0),
        ("eta 0", recipe, 1.7, 0.0, 0),
        ("guidance 1.0", recipe, 1.0, 0.2, 0),
        ("guidance 1.0, eta 0", recipe, 1.0, 0.0, 0),
        ("x0 clipped at the first step", recipe, 1.7, 0.2, 1),
        ("timesteps [999, 749]", [999, 749], 1.7, 0.2, 0),
        ("timesteps [999, 259]", [999, 259], 1.7, 0.2, 0),
        ("timesteps [999, 259], guidance 1.0, eta 0", [999, 259], 1.0, 0.0, 0),
    ]
    out = []
    for label, steps, g, e, clip in variants:
        hits = hits_of(net, cal.run(steps, g, e, x0_clip_steps=clip).pixels, labels)
        out.append((label, qm.bootstrap_ci(100 * hits, n_boot, seed=0)))
        log.info("2 steps, %s: %s", label, out[-1][1])
    return out


def fmt(key) -> str:
    return f"{key[1]:g} / {key[2]:g}"


def est(e: qm.Estimate) -> str:
    return f"{e.value:.1f} [{e.lo:.1f}, {e.hi:.1f}]"


def report(rows, mean_regret, grid, sweep, args, seconds, two_step) -> str:
    from trainer import calibrate

    if not rows:  # the 2-step study alone
        lines = ["# 2 steps: the TDD recipe and variants within the method", "",
                 f"Written by `bench/calibration_criteria.py --steps --two-step` (LoRA `{Path(args.lora).name}`, "
                 f"{args.two_step_prompts} prompts of seed {args.prompt_seed}, noises of seed {args.noise_seed}, "
                 f"{seconds / 60:.1f} min). Accuracy: the attribute classifier's mean, 95% bootstrap intervals.", "",
                 "| variant | accuracy % |", "|---|---|", *[f"| {label} | {est(e)} |" for label, e in two_step or []]]
        return "\n".join(lines) + "\n"
    lines = [
        "# Calibration criteria against the demo classifier",
        "",
        f"Written by `bench/calibration_criteria.py` ({args.prompts} prompts of seed {args.prompt_seed}, noises of "
        f"seed {args.noise_seed}, LoRA `{Path(args.lora).name}`, {len(grid)} settings, {seconds / 60:.1f} min). Each "
        "criterion is a distance to the teacher's 25-step image (CFG 4.5) from the same prompt and noise; the "
        "classifier's mean attribute accuracy is the ground truth. *choice*: the trainer's coordinate search "
        "(guidance at eta 0.2, then eta) over the criterion; *regret*: best accuracy on the grid minus accuracy "
        "at the choice, in points (paired bootstrap 95% interval over prompts); *grid regret*: the same for the "
        "criterion's minimum over the whole grid; *rank corr.*: Spearman correlation of -criterion and accuracy "
        "across the grid's settings.",
        "",
    ]
    if rows:
        lines += ["| criterion | steps | choice (guidance / eta) | accuracy % | classifier's best | best accuracy % | "
                  "regret (points) | grid regret | rank corr. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['steps']} | {fmt(r['choice'])} | {est(r['accuracy'])} | {fmt(r['best'])} | "
                     f"{est(r['best_accuracy'])} | {est(r['regret'])} | {r['grid_regret']:.1f} | {r['spearman']:.2f} |")
    if mean_regret:
        keep = min(mean_regret, key=mean_regret.get)
        lines += ["", "Mean regret of the coordinate-search choice over the step counts: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(mean_regret.items(), key=lambda kv: kv[1]))
                  + f". Smallest: **{keep}** (the trainer's default is `{calibrate.DEFAULT_CRITERION}`).", "",
                  "The fixed TDD recipe on the same grid:", "", "| steps | guidance / eta | accuracy % |",
                  "|---|---|---|", *fixed_rows(grid, sweep, args.n_boot)]
    if two_step:
        lines += ["", "## 2 steps: the TDD recipe and variants within the method", "",
                  f"{args.two_step_prompts} prompts of seed {args.prompt_seed}, noises of seed {args.noise_seed}.", "",
                  "| variant | accuracy % |", "|---|---|", *[f"| {label} | {est(e)} |" for label, e in two_step]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", default=str(DEMO_LORA))
    ap.add_argument("--prompt-seed", type=int, default=PROMPT_SEED,
                    help="scenes of this dataset seed (1000: the quality bench's evaluation prompts)")
    ap.add_argument("--noise-seed", type=int, default=NOISE_SEED)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, nargs="*", default=[4, 8], help="step counts of the grid (none: no grid)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--two-step", action="store_true", help="also the 2-step study")
    ap.add_argument("--two-step-prompts", type=int, default=1024)
    ap.add_argument("--out", default=str(REPO / "out" / "calibration_criteria"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from demo import classifier, dataset
    from trainer import calibrate
    from trainer.models import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher("nodes/demo_model.py:load_demo", dtype=torch.float32, device="cpu")
    lora = Path(args.lora)
    net = classifier.load()

    def setup(n: int):
        scenes = [dataset.sample(args.prompt_seed, i)[2] for i in range(n)]
        labels = {k: v.numpy() for k, v in classifier.labels(scenes).items()}
        cal = calibrate.Calibrator(teacher, lambda on: teacher.lora_file_applied(lora) if on else
                                   contextlib.nullcontext(), [s.caption for s in scenes], 64, seed=args.noise_seed,
                                   batch=args.batch, reference_guidance=TEACHER_CFG)
        return cal, labels

    sweep = calibrate.Sweep(steps=tuple(args.steps))
    grid, rows, mean_regret = {}, [], {}
    if args.steps:
        cal, labels = setup(args.prompts)
        grid = measure_grid(cal, sweep, net, labels)
        rows, mean_regret = analyse(grid, sweep, args.n_boot)
    two_step = None
    if args.two_step:
        cal2, labels2 = setup(args.two_step_prompts)
        two_step = two_step_study(cal2, net, labels2, args.n_boot)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(rows, mean_regret, grid, sweep, args, time.perf_counter() - t0, two_step)
    (out / "criteria.md").write_text(text)
    (out / "grid.json").write_text(json.dumps(
        {" ".join(map(str, k)): {name: float(np.mean(v)) for name, v in row.items()} for k, row in grid.items()},
        indent=1))
    log.info("wrote %s\n%s", out / "criteria.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
