"""Calibration of the recommended sampler settings (trainer/calibrate.py) on constructed cases and on
the tiny model: the search finds a known optimum, the sweep is seeded, the result travels through
the LoRA's metadata to TDD LoRA Loader, and recalibrating a file never changes the original."""
from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
import torch

from trainer_fixtures import RESOLUTION, make_images, tiny_args, tiny_sd15, train_config

from trainer import calibrate
from trainer.lora_format import read_header_metadata, recommended_settings


# ---- the search, on scores that know the answer ------------------------------------------------

@pytest.mark.parametrize("search", ["coordinate", "grid"])
@pytest.mark.parametrize("optimum", [(4, 1.3, 0.1), (6, 2.5, 0.0), (8, 1.0, 0.3)])
def test_search_finds_the_setting_a_known_criterion_prefers(search, optimum):
    """A criterion with one known minimum per step count (a bowl around ``optimum``'s guidance and
    eta): both searches return it, at every step count."""
    _, g_star, e_star = optimum

    def score(s: calibrate.Setting) -> float:
        return (s.guidance - g_star) ** 2 + 3 * (s.eta - e_star) ** 2 + 0.01 * s.steps

    sweep = calibrate.Sweep(search=search)
    best, scores = calibrate.search(score, sweep, eta0=0.2)
    assert {k: (b.guidance, b.eta) for k, b in best.items()} == {k: (g_star, e_star) for k in sweep.steps}
    n_pairs = len(sweep.guidances) * len(sweep.etas)
    expected = n_pairs if search == "grid" else len(sweep.guidances) + len(sweep.etas) - 1
    assert len(scores) == expected * len(sweep.steps)


def test_criteria_are_zero_on_the_reference_and_grow_with_distance():
    torch.manual_seed(0)
    lat = torch.randn(3, 4, 8, 8)
    decode = lambda z: torch.sigmoid(z[:, :3]).movedim(1, -1)  # noqa: E731  a stand-in VAE
    ref = calibrate.Sample(lat, decode)
    near, far = calibrate.Sample(lat + 0.1, decode), calibrate.Sample(lat + 1.0, decode)
    for name, fn in calibrate.CRITERIA.items():
        assert torch.allclose(fn(ref, ref), torch.zeros(3)), name
        assert (fn(near, ref) < fn(far, ref)).all(), name


def test_saturation_penalty_counts_clipped_pixels_beyond_the_teachers():
    ref = calibrate.Sample(torch.zeros(1, 1), lambda z: torch.full((1, 4, 4, 3), 0.5))
    white = torch.full((1, 4, 4, 3), 0.5)
    white[0, :2] = 1.0  # half the pixels clipped
    s = calibrate.Sample(torch.zeros(1, 1), lambda z: white)
    assert calibrate.excess_saturation(s, ref).item() == pytest.approx(0.5)
    assert calibrate.pixel_mse_saturation(s, ref).item() == pytest.approx(
        calibrate.pixel_mse(s, ref).item() + 0.25 * 0.5)


# ---- on the tiny model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(host):  # (host first: the in-process ComfyUI must set itself up before the trainer imports comfy)
    from trainer.models import Teacher

    return Teacher(*tiny_sd15(0), name="tiny")


def calibrator(teacher, n=4, seed=0, batch=16, reference_guidance=None):
    captions = ["a red square", "a blue square", "a green square", "a yellow square"][:n]
    return calibrate.Calibrator(teacher, lambda on: contextlib.nullcontext(), captions, RESOLUTION, seed=seed,
                                batch=batch, reference_guidance=reference_guidance)


def test_calibration_picks_the_teachers_own_guidance_when_the_student_is_the_teacher(tiny_teacher):
    """Student == teacher (the LoRA switch does nothing) and a deterministic reference at guidance
    2.0: the setting nearest the reference is guidance 2.0, eta 0, by every pure distance. (The
    saturation penalty may prefer less guidance: on the random tiny VAE more guidance clips more.)"""
    sweep = calibrate.Sweep(steps=(8,), guidances=(1.0, 2.0, 4.0), etas=(0.0, 0.3), search="grid")
    for name in ("latent", "pixel", "lowpass"):
        result = calibrate.calibrate(calibrator(tiny_teacher, reference_guidance=2.0), sweep, name, 8, 0.2)
        assert (result.recommended.guidance, result.recommended.eta) == (2.0, 0.0), (name, result.scores)


def test_calibration_is_deterministic_for_a_seed_and_independent_of_the_batch(tiny_teacher):
    sweep = calibrate.Sweep(steps=(4,), guidances=(1.0, 1.5), etas=(0.0, 0.2))
    a = calibrate.calibrate(calibrator(tiny_teacher, seed=3), sweep, "latent", 4, 0.2)
    b = calibrate.calibrate(calibrator(tiny_teacher, seed=3, batch=3), sweep, "latent", 4, 0.2)
    c = calibrate.calibrate(calibrator(tiny_teacher, seed=4), sweep, "latent", 4, 0.2)
    assert a.scores.keys() == b.scores.keys()
    for k in a.scores:
        assert a.scores[k] == pytest.approx(b.scores[k], rel=1e-5, abs=1e-7)
    assert a.scores != c.scores


def test_held_out_captions_are_a_seeded_draw_of_the_data():
    caps = [f"caption {i}" for i in range(10)] + [""]
    a = calibrate.held_out_captions(caps, 6, seed=1)
    assert a == calibrate.held_out_captions(caps, 6, seed=1)
    assert a != calibrate.held_out_captions(caps, 6, seed=2)
    assert "" not in a and len(set(a)) == 6
    assert len(calibrate.held_out_captions(["one"], 3, seed=0)) == 3


# ---- through the trainer and the loader ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, host):
    """A tiny run with calibration (4 prompts) and one without."""
    from trainer.loop import train

    tmp = tmp_path_factory.mktemp("calibrated")
    data = make_images(tmp / "data", n=4)
    on = train(train_config(data, tmp / "on", calibrate=True, calibrate_prompts=4), components=tiny_sd15(0))
    off = train(train_config(data, tmp / "off"), components=tiny_sd15(0))
    return tmp, data, on, off


def test_trained_file_carries_the_calibration(trained):
    _, _, on, _ = trained
    meta = read_header_metadata(on["out"])
    table = json.loads(meta["tdd_calibration"])
    assert table["prompts"] == 4 and table["criterion"] == calibrate.DEFAULT_CRITERION
    assert 0 < table["fraction_of_run"]
    best4 = table["best"]["4"]
    assert (float(meta["tdd_recommended_guidance"]), float(meta["tdd_recommended_eta"])) == (
        best4["guidance"], best4["eta"])
    assert meta["tdd_recommended_steps"] == "4"
    # every score in the table is the mean criterion of a swept setting; the chosen one is the lowest
    at4 = [row for row in table["scores"] if row[0] == 4]
    chosen = [row for row in at4 if (row[1], row[2]) == (best4["guidance"], best4["eta"])][0]
    assert chosen[3] == min(row[3] for row in at4)


def test_no_calibrate_writes_the_family_defaults(trained):
    _, _, _, off = trained
    meta = read_header_metadata(off["out"])
    assert "tdd_calibration" not in meta
    defaults = recommended_settings("tdd", 4, 8, "sd15")
    assert {k: meta[k] for k in defaults} == {k: str(v) for k, v in defaults.items()}


def test_calibration_does_not_change_the_lora(trained):
    from trainer_fixtures import lora_tensors

    _, _, on, off = trained
    a, b = lora_tensors(on["out"]), lora_tensors(off["out"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_outputs_and_info_carry_the_calibrated_values(trained, host, comfy_base):
    from harness import run_node

    _, _, on, _ = trained
    target = comfy_base / "models" / "loras" / "calibrated_tiny.safetensors"
    target.write_bytes(open(on["out"], "rb").read())
    meta = read_header_metadata(target)
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    _, _, info, steps, eta, guidance = run_node(host, "TDDLoraLoader", model=model, clip=clip,
                                                lora_name=target.name, strength_model=1.0, strength_clip=1.0)
    assert (steps, eta, guidance) == (int(meta["tdd_recommended_steps"]), float(meta["tdd_recommended_eta"]),
                                      float(meta["tdd_recommended_guidance"]))
    assert "metadata, measured" in info and "calibrated on 4 prompts" in info, info


def test_cancel_while_calibrating_writes_no_lora_and_resume_finishes(tmp_path, monkeypatch):
    """A host's Cancel arriving during calibration: no LoRA file, the checkpoint holds every step, and
    a resume calibrates and writes the same LoRA as an uninterrupted run."""
    from trainer.loop import train

    class Cancel(Exception):
        pass

    data = make_images(tmp_path / "data", n=4)
    real_sample = calibrate.Calibrator.sample

    def cancelled(self, s):
        raise Cancel()

    monkeypatch.setattr(calibrate.Calibrator, "sample", cancelled)
    r = train(train_config(data, tmp_path / "a", calibrate=True, calibrate_prompts=2), components=tiny_sd15(0),
              interrupts=(Cancel,))
    assert r["status"] == "interrupted" and r["out"] is None
    assert not (tmp_path / "a" / "lora.safetensors").exists()
    monkeypatch.setattr(calibrate.Calibrator, "sample", real_sample)
    done = train(train_config(data, tmp_path / "a", calibrate=True, calibrate_prompts=2, resume=r["run_dir"]),
                 components=tiny_sd15(0))
    assert done["status"] == "done" and done["step"] == 2
    assert "tdd_calibration" in read_header_metadata(done["out"])


# ---- python -m trainer.calibrate ----------------------------------------------------------------

def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_cli_recalibrates_a_copy_and_leaves_the_original_untouched(trained, tmp_path):
    """A released-style file (kohya keys, no tdd_* metadata) and a trainer file: each gets a calibrated
    copy; the original's bytes never change; the tensors are the same."""
    import safetensors.torch

    _, _, _, off = trained
    released = tmp_path / "released.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(off["out"]), str(released))  # no metadata
    for src in (released, off["out"]):
        before = sha(src)
        out = tmp_path / f"{hash(str(src)) & 0xffff}_cal.safetensors"
        status = calibrate.main(["--teacher", tiny_args("x", tmp_path)[1], "--lora", str(src), "--out", str(out),
                                 "--prompts", "2", "--steps", "4", "--resolution", str(RESOLUTION),
                                 "--device", "cpu"])
        assert status == 0
        assert sha(src) == before
        meta = read_header_metadata(out)
        assert json.loads(meta["tdd_calibration"])["prompts"] == 2
        a, b = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_refuses_to_write_over_the_original(trained, tmp_path, caplog):
    _, _, _, off = trained
    before = sha(off["out"])
    status = calibrate.main(["--teacher", tiny_args("x", tmp_path)[1], "--lora", off["out"], "--out", off["out"]])
    assert status == 2 and sha(off["out"]) == before
    assert "writes a copy" in caplog.text


def test_cli_names_a_missing_lora(tmp_path, caplog):
    status = calibrate.main(["--teacher", tiny_args("x", tmp_path)[1], "--lora", str(tmp_path / "nope.safetensors")])
    assert status == 2 and "no such file" in caplog.text
