"""Calibration that fits the run (trainer/calibrate.py's budget rule, docs/trainer.md#calibrated-settings):
the rule on its own (the full preset keeps today's sweep, shorter runs get cheaper levels, explicit
flags switch it off), a short run on the demo model whose calibration - counted in model evaluations
by a hook on the diffusion model, not in wall time - stays within its budget, the floor of a very short
run, and a stop request (SIGTERM, Ctrl-C) during calibration honoured within seconds by the CLI, the
checkpoint kept and ``--resume`` calibrating and writing the LoRA."""
from __future__ import annotations

import json
import signal
import sys
import tomllib

import pytest

import trainer_fixtures as fx

from trainer import calibrate
from trainer.lora_format import read_header_metadata

REPO = fx.REPO


def plan(samples: int, arch: str = "sd15", method: str = "tdd", **kw) -> calibrate.Plan:
    return calibrate.plan_for_run(arch, method, 4, 8, samples, 3.5 if arch == "flux" else 4.5, **kw)


def preset_samples(path) -> int:
    """Training samples of a TOML run: steps x global batch (``accumulate_to`` when it sets one)."""
    values = tomllib.loads(path.read_text())
    return values["max_steps"] * values.get("accumulate_to", values["batch_size"])


# ---- the rule ------------------------------------------------------------------------------------

def test_the_full_preset_keeps_the_full_sweep():
    """The demo's full-length run (demo/distill_demo.toml, bench/quality.py --preset full: 1,200 x 32) and
    the reference presets calibrate as before the rule: 32 prompts over the family's whole sweep."""
    for toml, arch in [(REPO / "demo" / "distill_demo.toml", "sd15"), (REPO / "trainer" / "presets" / "sd15.toml",
                                                                       "sd15"),
                       (REPO / "trainer" / "presets" / "sdxl.toml", "sdxl"),
                       (REPO / "trainer" / "presets" / "flux.toml", "flux")]:
        p = plan(preset_samples(toml), arch)
        assert (p.level, p.prompts) == ("full", 32), (toml.name, p)
        assert p.sweep == calibrate.Sweep.for_family(arch, "tdd"), toml.name
        assert p.evaluations <= p.budget
    demo = plan(preset_samples(REPO / "demo" / "distill_demo.toml"))
    assert demo.evaluations == 12_480 and demo.training_evaluations == 1200 * 32 * 6  # docs/trainer.md's figures


def test_shorter_runs_get_cheaper_levels_in_order_within_the_budget():
    """From long to short: full sweep, then only the recommended step count, then the coarse grid, then
    the floor; the cost never grows as the run shrinks, and it is within the budget above the floor."""
    order = ["full", "recommended steps", "coarse", "floor"]
    floor = plan(1)
    assert (floor.level, floor.prompts, floor.sweep.steps) == ("floor", calibrate.FLOOR_PROMPTS, (4,))
    last_level, last_cost = 0, None
    for samples in sorted({int(1.15 ** k) for k in range(120)}, reverse=True):
        p = plan(samples)
        level = order.index(p.level)
        assert level >= last_level, (samples, p)
        assert last_cost is None or p.evaluations <= last_cost, (samples, p)
        assert p.evaluations <= p.budget or p.level == "floor", (samples, p)
        assert p.prompts <= calibrate.FULL_PROMPTS
        if p.level != "floor" and p.level != "coarse":
            assert p.prompts >= calibrate.MIN_PROMPTS
        last_level, last_cost = level, p.evaluations
    assert last_cost == floor.evaluations  # the shortest runs all cost the floor
    # the demo's `make quality` small preset (250 x 16) and TDD Distill's quick preset (200 x 8)
    assert (plan(250 * 16).level, plan(250 * 16).prompts) == ("recommended steps", 20)
    assert (plan(200 * 8).level, plan(200 * 8).prompts) == ("recommended steps", 8)


def test_a_larger_budget_fraction_buys_a_larger_plan():
    small, large = plan(4000, fraction=0.05), plan(4000, fraction=0.5)
    assert small.evaluations < large.evaluations <= large.budget


def test_explicit_prompts_or_steps_switch_the_budget_off():
    p = plan(4, prompts=32)
    assert (p.level, p.prompts, p.budget) == ("explicit", 32, None)
    assert p.sweep == calibrate.Sweep.for_family("sd15", "tdd")
    q = plan(4, steps=(2, 4))
    assert (q.level, q.prompts, q.sweep.steps) == ("explicit", calibrate.FULL_PROMPTS, (2, 4))


def test_flags_reach_the_config():
    from trainer.config import ConfigError, parse_args

    base = ["--teacher", "t.safetensors", "--data", "d"]
    cfg = parse_args(base)
    assert (cfg.calibrate_budget, cfg.calibrate_prompts, cfg.calibrate_steps) == (calibrate.DEFAULT_BUDGET, None, None)
    cfg = parse_args([*base, "--calibrate-budget", "0.25", "--calibrate-steps", "2", "4", "--calibrate-prompts", "6"])
    assert (cfg.calibrate_budget, cfg.calibrate_prompts, cfg.calibrate_steps) == (0.25, 6, [2, 4])
    with pytest.raises(ConfigError, match="--calibrate-budget"):
        parse_args([*base, "--calibrate-budget", "0"])
    with pytest.raises(ConfigError, match="--calibrate-steps"):
        parse_args([*base, "--calibrate-steps", "0"])


# ---- counted on real models ---------------------------------------------------------------------

class EvalCounter:
    """Images through the diffusion model (a forward hook: counts what really ran, whatever calibrate.py thinks)."""

    def __init__(self, teacher):
        self.n = 0
        self.handle = teacher.model.diffusion_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.n += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def demo_images(folder, n: int):
    from PIL import Image

    from demo import dataset

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, caption, _ = dataset.sample(0, i)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    return folder


def test_a_short_demo_run_calibrates_within_its_budget(trainer_host, tmp_path):
    """20 steps x batch 32 on the demo model (640 samples: 3,840 training evaluations, budget 384):
    the calibration it runs, counted at the diffusion model, is what calibrate.py counted and planned,
    within 10% of the training run's evaluations; the file records the plan and why."""
    from trainer.fileio import load_module
    from trainer.loop import train
    from trainer.models import from_components

    demo = load_module(REPO / "nodes" / "demo_model.py", "tdd_demo_model_budget_test")
    teacher = from_components(*demo.load_demo())
    steps, batch = 20, 32
    cfg = fx.train_config(demo_images(tmp_path / "data", 32), tmp_path, max_steps=steps, batch_size=batch,
                          calibrate=True, lr=1e-4, save_every=steps)
    trained_at = {}
    with EvalCounter(teacher) as counter:
        r = train(cfg, components=teacher, on_step=lambda run, row: trained_at.update(n=counter.n))
    assert r["status"] == "done"
    training, calibration = trained_at["n"], counter.n - trained_at["n"]
    assert training == 4 * steps * batch  # forwards per sample; the rule adds the backward as 2 (6 per sample)
    table = json.loads(read_header_metadata(r["out"])["tdd_calibration"])
    planned = table["plan"]
    assert calibration == table["evaluations"] <= planned["planned_evaluations"] <= planned["budget_evaluations"]
    assert calibration <= calibrate.DEFAULT_BUDGET * calibrate.TRAIN_EVALS_PER_SAMPLE * steps * batch
    assert planned["training_evaluations"] == calibrate.TRAIN_EVALS_PER_SAMPLE * steps * batch
    assert planned["level"] == "coarse" and table["prompts"] == 4 and "10% of the training run" in planned["reason"]


def test_a_very_short_run_calibrates_at_the_floor(tiny_sd15, train_images, tmp_path, caplog):
    """2 steps x 2 images can't pay for any calibration: the floor runs (4 prompts, the recommended step
    count, the coarse grid), the cost line says so before it starts, and the file records it."""
    import logging

    from trainer.loop import train
    from trainer.models import Teacher

    teacher = Teacher(*tiny_sd15, name="tiny")
    with EvalCounter(teacher) as counter, caplog.at_level(logging.INFO, logger="trainer"):
        r = train(fx.train_config(train_images, tmp_path, calibrate=True), components=teacher)
    floor = plan(2 * 2)
    table = json.loads(read_header_metadata(r["out"])["tdd_calibration"])
    assert table["plan"]["level"] == "floor" and table["prompts"] == calibrate.FLOOR_PROMPTS
    assert table["evaluations"] <= floor.evaluations and counter.n == 4 * 2 * 2 + table["evaluations"]
    assert list(table["best"]) == ["4"]
    line = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("calibrating (floor)")]
    assert line and f"{floor.evaluations} model evaluations" in line[0] and "at this run's training speed" in line[0]


# ---- a stop request during calibration (the CLI) ------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_calibration_is_honoured_within_seconds(train_images, tmp_path, sig):
    """SIGTERM / Ctrl-C while the CLI calibrates (an explicit, long sweep): the process exits cleanly
    within a few seconds, writes no LoRA and keeps the last step's checkpoint; --resume calibrates and
    writes the LoRA without training again."""
    from trainer.loop import train

    args = fx.tiny_args(train_images, tmp_path, "--calibrate", "--calibrate-prompts", "256", "--progress")
    status, delay, text = fx.stop_while_calibrating([sys.executable, str(REPO / "trainer" / "distill.py"), *args],
                                                    tmp_path, sig)
    assert status == 0, text[-3000:]
    assert delay < 5.0, f"{delay:.1f} s from {sig.name} to exit"
    assert "stopped while calibrating" in text and f"--resume {tmp_path / 'run'}" in text, text[-3000:]
    assert not (tmp_path / "lora.safetensors").exists()
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoint-000002"
    r = train(fx.train_config(train_images, tmp_path, calibrate=True, calibrate_prompts=2, calibrate_steps=[4],
                              resume=str(tmp_path / "run")), components=fx.tiny_sd15(0))
    assert r["status"] == "done" and r["losses"] == []  # nothing trained again
    assert json.loads(read_header_metadata(r["out"])["tdd_calibration"])["prompts"] == 2
    assert [int(row["step"]) for row in fx.read_log(tmp_path / "run")] == [1, 2]
    print(f"{sig.name}: exited {delay:.2f} s after the signal")


def test_the_calibration_count_matches_the_models(trainer_host, tiny_sd15):
    """Calibrate's own count (progress, metadata) equals the images the diffusion model evaluated, for
    a CFG sweep and the coordinate search's shared settings; the plan is an upper bound."""
    import contextlib

    from trainer.models import Teacher

    teacher = Teacher(*tiny_sd15, name="tiny")
    seen = []
    sweep = calibrate.Sweep(steps=(2, 4), guidances=(1.0, 1.5), etas=(0.0, 0.2))
    monitor = calibrate.Monitor(0, lambda done, total: seen.append(done))
    with EvalCounter(teacher) as counter:
        cal = calibrate.calibrate(calibrate.Calibrator(teacher, lambda on: contextlib.nullcontext(), ["a", "b", "c"],
                                                       fx.RESOLUTION, batch=2, monitor=monitor), sweep, "latent", 4,
                                  0.2)
    assert cal.evaluations == counter.n == seen[-1] and seen == sorted(seen)
    assert cal.evaluations <= 3 * calibrate.evaluations_per_prompt(sweep, "sd15", 0.2, 4.5)
    with pytest.raises(calibrate.CalibrationStopped):
        calibrate.calibrate(calibrate.Calibrator(teacher, lambda on: contextlib.nullcontext(), ["a"], fx.RESOLUTION,
                                                 monitor=calibrate.Monitor(0, stop=lambda: True)),
                            sweep, "latent", 4, 0.2)
