"""bench/quality.py's own machinery (not its results): the TCD schedule it cites, the method list,
and its sampling recipes on the real in-process ComfyUI host with the demo teacher.

The end-to-end smoke preset (training four students included) takes minutes on 2 cores, so it is
run by hand (`bench/quality.py --preset smoke`), not here.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

import harness

sys.path.insert(0, str(harness.REPO / "bench"))
import quality  # noqa: E402

PROMPTS = ["a red striped circle at the top left on a light background",
           "a blue square at the bottom right on a dark background"]


@pytest.mark.parametrize("steps", [2, 4, 6, 8])
def test_tcd_timesteps_are_diffusers_tcd_schedule(steps):
    from diffusers import TCDScheduler

    sched = TCDScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         timestep_spacing="leading", steps_offset=1)
    assert sched.config.original_inference_steps == 50  # the pipeline's default, used by TCD's own examples
    sched.set_timesteps(steps)
    assert quality.tcd_timesteps(steps) == sched.timesteps.tolist()


def test_methods_follow_the_trainer():
    from trainer.config import TrainConfig

    names = [s.name for s in quality.available_students()]
    assert names[:3] == ["tdd", "tcd", "lcm"]
    has_adv = "adversarial" in {f.name for f in dataclasses.fields(TrainConfig)}
    assert ("tdd_adv" in names) == has_adv


def test_every_student_gets_the_same_budget():
    preset = quality.PRESETS["small"]
    shared = [quality.train_argv(s, preset)[:-len(s.train_flags)] for s in quality.available_students()]
    assert all(a == shared[0] for a in shared)
    keys = {quality.student_key(s, preset) for s in quality.available_students()}
    assert len(keys) == len(quality.available_students())


def test_too_few_samples_is_refused():
    with pytest.raises(SystemExit, match="at least 2"):
        quality.resolve_preset(quality.parse_args(["--preset", "smoke", "--samples", "1"]))


def test_methods_pick_a_subset_and_name_the_choices():
    students = quality.available_students()
    assert [s.name for s in quality.select_students(students, "lcm, tdd")] == ["tdd", "lcm"]  # the bench's order
    assert quality.select_students(students, None) == students
    with pytest.raises(SystemExit, match="unknown sdxl; choose from .*lcm.*tcd.*tdd"):
        quality.select_students(students, "tdd,sdxl")
    with pytest.raises(SystemExit, match="unknown sdxl"):
        quality.main(["--preset", "smoke", "--methods", "tdd,sdxl"])  # refused before the host loads


def test_students_are_dealt_round_robin():
    students = quality.available_students()
    shares = quality.share_out(students, 2)
    assert sorted(s.name for share in shares for s in share) == sorted(s.name for s in students)
    assert [s.name for s in shares[0]][:2] == ["tdd", "lcm"]
    assert len(quality.share_out(students[:1], 4)) == 1  # no empty process
    assert len(quality.share_out(students, 1)) == 1


def test_side_by_side_training_fills_the_cache(tmp_path, monkeypatch, comfy_base):
    """--jobs 2: two child processes train a student each into the cache the parent then reads; a child
    that fails names its log."""
    monkeypatch.setenv("TDD_QUALITY_WORK", str(tmp_path))
    monkeypatch.setattr(quality, "WORK", tmp_path)
    preset = quality.PRESETS["smoke"]
    data = quality.write_data(preset)
    students = quality.select_students(quality.available_students(), "tcd,lcm")
    args = quality.parse_args(["--preset", "smoke", "--jobs", "2"])
    quality.train_side_by_side(students, args)
    for s in students:
        key = quality.student_key(s, preset)
        assert (tmp_path / "students" / f"{key}.safetensors").is_file(), s.name
        assert (tmp_path / f"train_smoke_{s.name}.log").is_file()
        _, record = quality.train_student(s, preset, data)
        assert record["cached"] and record["train_seconds"] > 0
    bogus = quality.Student("nope", "Nope", ("--method", "nope"), "tdd")
    with pytest.raises(RuntimeError, match="training failed for nope .see .*train_smoke_nope.log"):
        quality.train_side_by_side([bogus], args)
    assert "unknown nope" in (tmp_path / "train_smoke_nope.log").read_text()


@pytest.fixture(scope="module")
def bench_host(host, comfy_base):
    return quality.Host(comfy_base)


def test_recipes_sample_every_method_in_the_host(bench_host):
    """Each recipe runs through ComfyUI's SamplerCustomAdvanced on the demo teacher and gives uint8 images;
    the same initial noise makes a recipe reproducible, different recipes give different images."""
    chunks = [bench_host.encode(PROMPTS)]
    images = {kind: bench_host.generate(kind, bench_host.model, 2, chunks) for kind in ("teacher", "tdd", "tcd", "lcm")}
    for kind, img in images.items():
        assert img.shape == (2, 64, 64, 3) and img.dtype == np.uint8, kind
    assert np.array_equal(images["teacher"], bench_host.generate("teacher", bench_host.model, 2, chunks))
    kinds = list(images)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert not np.array_equal(images[a], images[b]), (a, b)
    sweep = bench_host.generate("tdd", bench_host.model, 2, chunks, guidance=3.0)
    assert not np.array_equal(sweep, images["tdd"])
    calibrated = bench_host.generate("tdd", bench_host.model, 2, chunks, eta=0.0)  # the calibrated row's eta
    assert not np.array_equal(calibrated, images["tdd"])
    assert np.array_equal(bench_host.generate("tdd", bench_host.model, 2, chunks, eta=0.2), images["tdd"])


def test_calibrated_copy_of_a_student_as_the_trainer_makes_it(bench_host, tmp_path, monkeypatch):
    """The bench's calibration stage: a copy of the student with the trainer's calibration (here 2
    prompts at 2 steps, to stay fast), cached by criterion; the student file itself is not changed."""
    import hashlib

    from trainer.lora_format import read_header_metadata

    monkeypatch.setattr(quality, "WORK", tmp_path)
    monkeypatch.setattr(quality, "CALIBRATION_PROMPTS", 2)
    monkeypatch.setattr(quality, "STUDENT_STEPS", (2,))
    student = tmp_path / "student.safetensors"
    student.write_bytes((quality.REPO / "demo" / "loras" / "demo_tdd_lora.safetensors").read_bytes())
    before = hashlib.sha256(student.read_bytes()).hexdigest()
    data = quality.write_data(quality.PRESETS["smoke"])
    out, record = quality.calibrate_student(student, data, "pixel+saturation")
    assert out.name == "student_calibrated_pixel_saturation.safetensors" and not record["cached"]
    assert hashlib.sha256(student.read_bytes()).hexdigest() == before
    table = json.loads(read_header_metadata(out)["tdd_calibration"])
    assert table["prompts"] == 2 and table["criterion"] == "pixel+saturation"
    assert set(record["best"]) == {"2", "4"}  # the bench's steps, and the method's recommended 4
    assert record["best"]["2"] == [table["best"]["2"]["guidance"], table["best"]["2"]["eta"]]
    assert quality.calibrate_student(student, data, "pixel+saturation")[1]["cached"]


def test_stacked_prompts_condition_their_own_batch_item(bench_host):
    """Item k of a chunk is prompt k: the first image of [p0, p1] is the image of [p0] alone (same noise),
    and not the first image of [p1, p0]."""
    both = bench_host.generate("teacher", bench_host.model, 4, [bench_host.encode(PROMPTS)])
    alone = bench_host.generate("teacher", bench_host.model, 4, [bench_host.encode(PROMPTS[:1])])
    swapped = bench_host.generate("teacher", bench_host.model, 4, [bench_host.encode(PROMPTS[::-1])])
    assert np.abs(both[0].astype(int) - alone[0].astype(int)).max() <= 2
    assert np.abs(both[0].astype(int) - swapped[0].astype(int)).mean() > 5


def test_tcd_sigmas_sit_on_tcd_timesteps(bench_host):
    ms = bench_host.model.get_model_object("model_sampling")
    sigmas = bench_host.tcd_sigmas(bench_host.model, 4)
    assert float(sigmas[-1]) == 0.0
    assert [int(ms.timestep(s)) for s in sigmas[:-1]] == [999, 759, 499, 259]


def _run(method, label, steps, images, guidance=None):
    return quality.Run(method, label, steps, guidance, images, seconds=0.0)


def test_report_from_constructed_runs(tmp_path):
    """Scoring and the report on constructed images (no host, no training): a student that draws the real
    image of each prompt scores like the real images and is 'ahead of' one that draws each prompt's image
    in the wrong place of the batch; the teacher's 25-step run has fidelity 0; quality.md has a row per
    (method, steps), the sweep with the recommended scale, and its three plots exist."""
    from demo import dataset

    n = 24
    prompts = quality.eval_prompts(n)
    real = np.stack([dataset.sample(quality.PROMPT_SEED, i)[0] for i in range(n)])
    wrong = np.roll(real, 1, axis=0)
    runs = [_run("teacher", "teacher", s, real if s == 25 else wrong) for s in quality.TEACHER_STEPS]
    runs += [_run("tdd", "TDD", s, real) for s in quality.STUDENT_STEPS]
    runs += [_run("lcm", "LCM", s, wrong) for s in quality.STUDENT_STEPS]
    runs += [_run("tdd_sweep", "TDD", quality.SWEEP_STEPS, real, g) for g in quality.SWEEP_SCALES]
    runs += [quality.Run("tdd_cal", "TDD, calibrated", s, 1.3, real, 0.0, eta=0.1) for s in quality.STUDENT_STEPS]
    preset = dataclasses.replace(quality.PRESETS["smoke"], samples=n, n_boot=50, fd_boot=3)
    reference = quality.score(runs, prompts, preset)

    ref_mean = reference["real images of the prompts"]["mean"].value
    tdd4, lcm4 = (next(r for r in runs if r.method == m and r.steps == 4) for m in ("tdd", "lcm"))
    assert tdd4.metrics["mean"].value == ref_mean
    assert runs[3].metrics["fidelity"].value == 0.0 and runs[0].metrics["fidelity"].value > 0.0
    assert f"at 4 steps TDD ({quality.pct(tdd4.metrics['mean'])}) is ahead of LCM " \
           f"({quality.pct(lcm4.metrics['mean'])})" in quality.compare(runs, 4)
    assert any(line.startswith("at 4 steps TDD, calibrated") and "ahead of LCM" in line
               for line in quality.compare(runs, 4, "tdd_cal"))

    plots = quality.write_plots(runs, prompts, tmp_path / "quality")
    doc = tmp_path / "quality.md"
    students = [s for s in quality.STUDENTS if s.name in ("tdd", "lcm")]
    records = {s: {"train_seconds": 60.0, "train_cpu_seconds": 50.0, "cached": False} for s in students}
    records[students[1]] = {**records[students[1]], "cached": True, "side_by_side": 2}
    calibration = {"criterion": "lowpass", "prompts": 32, "settings_scored": 68, "seconds": 90.0,
                   "cpu_seconds": 88.0, "best": {"4": [1.3, 0.1]}}
    quality.write_doc(doc, runs, reference, records, plots, "smoke", preset, students,
                      {"sampling (all configurations)": (1.0, 1.0)}, calibration)
    text = doc.read_text()
    assert "### TDD, calibrated" in text and "| 4 | 1.3 | 0.1 |" in text and "criterion `lowpass`" in text
    assert "| calibrate TDD (32 prompts, 68 settings) | 1.5 min |" in text
    assert "| TDD, calibrated | 4 | " in text
    for label, steps in [("teacher", 25), ("TDD", 2), ("TDD", 8), ("LCM", 6)]:
        assert f"| {label} | {steps} | " in text
    assert f"| {quality.TDD_GUIDANCE} (recommended) |" in text and "| 3.0 |" in text
    assert text.count("(trained 2 at a time, one core each)") == 1 and text.count("(cached: an earlier run)") == 1
    for path in plots.values():
        assert path.is_file() and path.stat().st_size > 10_000
        assert f"]({path.relative_to(tmp_path)})" in text


def test_cross_scores_credit_the_student_not_the_recipe():
    """bench/quality_cross.py on constructed samplers (no host): a student that draws the prompts' real
    images scores 100% with every recipe; one whose 'lcm' recipe draws each prompt's image in the
    wrong place of the batch scores lower with that recipe only; the table has one row per pair."""
    import quality_cross
    from demo import classifier, dataset

    n = 24
    prompts = quality.eval_prompts(n)
    real = np.stack([dataset.sample(quality.PROMPT_SEED, i)[0] for i in range(n)])
    labels = {k: v.numpy() for k, v in classifier.labels(prompts.scenes).items()}

    def sample(recipe, model):
        return np.roll(real, 1, axis=0) if (model, recipe) == ("mixed", "lcm") else real

    rows = quality_cross.cross_scores(sample, {"good": "good", "mixed": "mixed"}, labels, classifier.load(), 50)
    means = {(label, recipe): c["mean"].value for label, recipe, c in rows}
    assert len(rows) == 2 * len(quality_cross.RECIPES)
    assert all(v == 1.0 for (label, recipe), v in means.items() if (label, recipe) != ("mixed", "lcm"))
    assert means["mixed", "lcm"] < 0.9
    text = quality_cross.table(rows)
    assert text.count("\n| mixed | ") == 3 and "| good | tdd | 100.0 [100.0, 100.0] |" in text


def test_training_seconds_sum_the_segments_of_a_resumed_run(tmp_path):
    """elapsed_s restarts at each resume: the student's cost is the sum of each segment's last value."""
    assert quality.training_seconds(tmp_path) is None
    (tmp_path / "log.csv").write_text("step,loss,lr,grad_norm,samples_per_s,elapsed_s\n"
                                      "1,0.1,0,0,1,10\n2,0.1,0,0,1,20\n"  # first session, checkpoint at step 2
                                      "3,0.1,0,0,1,5\n4,0.1,0,0,1,15\n"  # resumed
                                      "5,0.1,0,0,1,3\n")  # resumed again
    assert quality.training_seconds(tmp_path) == 20 + 15 + 3


def test_ablation_variants_share_the_bench_students_and_differ_by_their_flag():
    """bench/quality_ablate.py: its plain tdd/lcm variants are the bench's students (one cache), each other
    variant is the bench's TDD student plus one trainer flag the trainer accepts; an unknown name is refused."""
    import quality_ablate
    from trainer.config import TrainConfig, parse_args

    preset = quality.PRESETS["small"]
    bench = {s.name: s for s in quality.available_students()}
    for name in ("tdd", "lcm"):
        assert quality.student_key(quality_ablate.variant_student(name), preset) == quality.student_key(bench[name], preset)
    keys = {quality.student_key(quality_ablate.variant_student(v), preset) for v in quality_ablate.VARIANTS}
    assert len(keys) == len(quality_ablate.VARIANTS)
    for name, (_, flags, _) in quality_ablate.VARIANTS.items():
        cfg = parse_args(["--config", str(quality.TRAIN_CONFIG), "--data", "d", "--out", "o.safetensors", *flags])
        assert isinstance(cfg, TrainConfig), name
    assert parse_args(["--config", str(quality.TRAIN_CONFIG), "--data", "d", "--out", "o.safetensors",
                         *quality_ablate.VARIANTS["tdd_eta0"][1]]).eta_max == 0.0
    with pytest.raises(SystemExit, match="unknown 'sdxl'"):
        quality_ablate.variant_student("sdxl")


def test_criteria_bench_scores_a_criterion_by_the_classifiers_choice():
    """bench/calibration_criteria.py's analysis on a constructed grid: a criterion that orders the
    settings as the classifier does has no regret and rank correlation 1; one that orders them the
    other way picks the worst setting."""
    import calibration_criteria as cc
    from trainer import calibrate

    sweep = calibrate.Sweep(steps=(4,))
    rng = np.random.default_rng(0)
    grid = {}
    for g in sweep.guidances:
        for e in sweep.etas:
            p = 0.95 - 0.1 * abs(g - 1.3) - 0.2 * e  # best at guidance 1.3, eta 0
            hits = (rng.random(2000) < p).astype(float)
            grid[(4, g, e)] = {"hits": hits, "latent": np.full(2000, -p), "pixel": np.full(2000, p),
                               "lowpass": rng.random(2000), "pixel+saturation": rng.random(2000)}
    rows, mean_regret = cc.analyse(grid, sweep, n_boot=50)
    by = {r["criterion"]: r for r in rows}
    assert by["latent"]["choice"] == (4, 1.3, 0.0) and by["latent"]["spearman"] > 0.7
    assert by["pixel"]["choice"][2] == 0.3 and by["pixel"]["spearman"] < -0.7
    assert mean_regret["latent"] < mean_regret["pixel"]
