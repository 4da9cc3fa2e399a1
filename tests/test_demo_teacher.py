"""The demo teacher's build and measuring scripts (demo/train_teacher.py, demo/measure_teacher.py) at
tiny step counts: their machinery, not the shipped model's quality (that is docs/demo_model.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch

import harness

sys.path.insert(0, str(harness.REPO / "bench"))
from demo import measure_teacher  # noqa: E402
from demo import train_teacher  # noqa: E402

TINY = ["--vae-crop-steps", "2", "--vae-steps", "1", "--focus-crop-steps", "1", "--focus-steps", "1",
        "--unet-steps", "2", "--unet-more-steps", "2", "--decoder-steps", "1", "--decoder-dark-steps", "1",
        "--dataset-size", "16", "--threads", "0"]


def weights(folder):
    return {f: safetensors.torch.load_file(str(folder / f)) for f in ("demo_unet.safetensors", "demo_clip.safetensors",
                                                                      "demo_vae.safetensors")}


def test_phases_run_separately_give_the_same_weights_as_one_run(tmp_path, host):
    """`--phase all` and the phases run one by one (decoder before unet: they only share the VAE
    phase's output) write bit-identical weights, which the demo model builds from."""
    train_teacher.main([*TINY, "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "all")])
    for phase in ("vae", "vae_focus", "decoder", "unet", "unet_more", "assemble"):
        train_teacher.main([*TINY, "--phase", phase, "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "split")])
    one, split = weights(tmp_path / "all"), weights(tmp_path / "split")
    for name in one:
        assert one[name].keys() == split[name].keys()
        assert all(np.array_equal(one[name][k].numpy(), split[name][k].numpy()) for k in one[name]), name
    record = (tmp_path / "all" / "teacher_train.json").read_text()
    assert '"vae_reconstruction_accuracy"' in record and '"unet_steps": 2' in record
    model, clip, vae = train_teacher.load_demo_module().build(str(tmp_path / "all"))
    assert vae.first_stage_model.decoder.conv_out.weight.dtype.is_floating_point


def test_a_missing_phase_output_is_named(tmp_path, host):
    with pytest.raises(SystemExit, match="vae.safetensors is missing: run the phase that writes it first"):
        train_teacher.main([*TINY, "--phase", "unet", "--work", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_shape_crops_hold_the_shape_on_the_latent_grid():
    from demo import dataset

    crops = train_teacher.shape_crops(0, 0, 32).numpy()
    assert crops.shape == (32, 3, 32, 32)
    for i, crop in enumerate(crops):  # the shape's colour is in the crop
        colour = np.array(dataset.COLOURS[dataset.sample(0, i)[2].colour]) / 127.5 - 1
        assert (np.abs(crop.transpose(1, 2, 0) - colour).max(axis=-1) < 0.1).sum() > 10, i


def test_foreground_weight_covers_the_shape_and_its_gaps():
    """The weighted region is the shape with its stripes' background-coloured gaps; far background is 1."""
    import torch

    from demo import dataset

    img = dataset.render(dataset.Scene("square", "red", "striped", "center", "light"))
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    w = train_teacher.foreground_weight(x, 10.0)[0, 0].numpy()
    light = np.array(dataset.BACKGROUNDS["light"])
    gaps = (np.abs(img.astype(float) - light).sum(-1) < 20)[26:38, 26:38]  # background-coloured pixels inside
    assert gaps.any() and (w[26:38, 26:38] == 10).all()
    assert (w[:8, :8] == 1).all() and (w[-8:, -8:] == 1).all()
    assert (train_teacher.foreground_weight(x, 1) == 1).all()


def test_dark_weight_picks_the_dark_background_images():
    import torch

    from demo import dataset

    imgs = [dataset.render(dataset.Scene("circle", "green", "solid", "center", bg)) for bg in ("light", "dark", "dark")]
    x = torch.from_numpy(np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1)
    assert train_teacher.dark_weight(x, 3.0).flatten().tolist() == [1.0, 3.0, 3.0]
    assert (train_teacher.dark_weight(x, 1.0) == 1).all()


def test_measure_reads_real_images_perfectly_and_every_row(host, comfy_base):
    import quality

    bench_host = quality.Host(comfy_base)
    result = measure_teacher.measure(bench_host, samples=8, steps=2, cfg=3.0, chunk=4)
    assert list(result["figures"]) == ["real images", "VAE reconstruction", "teacher, 2 euler steps, CFG 3"]
    assert all(e.value == 1.0 for e in result["figures"]["real images"].values())
    for label, images in result["images"].items():
        assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8, label
    assert quality.TEACHER_CFG == 4.5  # restored


def test_unet_more_continues_from_the_unet_phase(tmp_path, host):
    """Phase `unet_more` starts from the `unet` phase's weights: at a zero learning rate it writes them
    back unchanged, and at its own learning rate it moves them."""
    work = tmp_path / "w"
    for phase in ("vae", "vae_focus", "unet"):
        train_teacher.main([*TINY, "--phase", phase, "--work", str(work)])
    before = safetensors.torch.load_file(str(work / "unet.safetensors"))
    for lr, same in (("0", True), ("3e-4", False)):
        (work / "unet_more.safetensors").unlink(missing_ok=True)  # a finished cycle is not rerun
        train_teacher.main([*TINY, "--phase", "unet_more", "--work", str(work), "--unet-more-lr", lr])
        after = safetensors.torch.load_file(str(work / "unet_more.safetensors"))
        assert before.keys() == after.keys()
        assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before) == same, lr


def test_more_unet_cycles_resume_a_finished_run_and_assemble_the_last(tmp_path, host):
    """`--unet-more-cycles 2` after a one-cycle run keeps cycle 1's file, trains cycle 2 from it
    (unchanged at a zero learning rate), and assemble ships cycle 2's weights."""
    work = tmp_path / "w"
    train_teacher.main([*TINY, "--unet-more-cycles", "1", "--work", str(work), "--out", str(tmp_path / "one")])
    first = safetensors.torch.load_file(str(work / "unet_more.safetensors"))
    train_teacher.main([*TINY, "--phase", "unet_more", "--unet-more-cycles", "2", "--unet-more-lr", "0",
                        "--work", str(work)])
    assert all(np.array_equal(first[k].numpy(), v.numpy())
               for k, v in safetensors.torch.load_file(str(work / "unet_more.safetensors")).items())
    second = safetensors.torch.load_file(str(work / "unet_more_2.safetensors"))
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    (work / "unet_more_2.safetensors").unlink()
    train_teacher.main([*TINY, "--phase", "unet_more", "--unet-more-cycles", "2", "--work", str(work)])
    second = safetensors.torch.load_file(str(work / "unet_more_2.safetensors"))
    assert not all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    train_teacher.main([*TINY, "--phase", "assemble", "--unet-more-cycles", "2", "--work", str(work),
                        "--out", str(tmp_path / "two")])
    shipped = weights(tmp_path / "two")["demo_unet.safetensors"]
    assert all(np.array_equal(second["unet." + k].half().numpy(), v.numpy()) for k, v in shipped.items())
    record = json.loads((tmp_path / "two" / "teacher_train.json").read_text())
    assert record["unet_more_cycles"] == 2 and set(record["unet_more_cycles_run"]) == {"unet_more", "unet_more_2"}


def test_decoder_phase_continues_from_a_file_and_noise_changes_what_it_learns(tmp_path, host):
    """`--decoder-init` starts the decoder phase from a VAE file (unchanged at a zero learning rate,
    the encoder always kept); `--decoder-latent-noise` trains on perturbed latents, so it learns
    something else than the same steps without it."""
    work = tmp_path / "w"
    for phase in ("vae", "vae_focus"):
        train_teacher.main([*TINY, "--phase", phase, "--work", str(work)])
    start = work / "start.safetensors"
    train_teacher.main([*TINY, "--phase", "decoder", "--work", str(work)])
    (work / "vae_final.safetensors").rename(start)

    def decoder(*flags):
        train_teacher.main([*TINY, "--phase", "decoder", "--work", str(work), "--decoder-init", str(start),
                            "--decoder-steps", "2", *flags])
        return safetensors.torch.load_file(str(work / "vae_final.safetensors"))

    before = safetensors.torch.load_file(str(start))
    still = decoder("--decoder-lr", "0")
    assert all(np.array_equal(before[k].numpy(), still[k].numpy()) for k in before)
    plain, noisy = decoder(), decoder("--decoder-latent-noise", "0.3")
    changed = [k for k in before if k.startswith("decoder.") and not np.array_equal(plain[k].numpy(), noisy[k].numpy())]
    assert changed, "latent noise made no difference to the decoder"
    assert all(np.array_equal(before[k].numpy(), noisy[k].numpy()) for k in before if k.startswith("encoder."))
    assert '"decoder_latent_noise": 0.3' in (work / "record_decoder.json").read_text()
    darker = decoder("--decoder-dark-weight", "10")
    assert any(not np.array_equal(plain[k].numpy(), darker[k].numpy()) for k in before if k.startswith("decoder."))


def test_teacher_cost_counts_the_shipped_recipe():
    """bench/teacher_cost.py projects `make demo-model` from train_teacher.py's defaults: 8,000 UNet steps
    (2,000 + two cycles of 3,000), 2,300 decoder steps, the dataset encoded by both UNet phases."""
    import teacher_cost

    counts = teacher_cost.recipe_counts(train_teacher.parser().parse_args([]))
    assert counts == {"vae": {"vae_crop": 1600, "vae_full": 300}, "vae_focus": {"vae_crop": 800, "vae_full": 200},
                      "unet": {"unet": 8000, "encode": 2 * 313}, "decoder": {"decoder": 2300}}


def test_teacher_cost_projects_both_schedules():
    import teacher_cost

    counts = {"vae": {"vae_crop": 10, "vae_full": 5}, "vae_focus": {"vae_crop": 5, "vae_full": 0},
              "unet": {"unet": 100, "encode": 0}, "decoder": {"decoder": 40}}
    alone2 = {"vae_crop": 1.0, "vae_full": 2.0, "unet": 1.0, "decoder": 1.0, "encode": 1.0}
    alone1 = {"unet": 1.5, "decoder": 1.5}
    side = {**alone2, "unet": 2.0, "decoder": 2.0}
    wall = teacher_cost.project(counts, alone2, alone1, side)
    vae = 10 + 10 + 5
    assert wall["serial x2"] == vae + 100 + 40
    # decoder 80 s side by side; the UNet does 40 steps meanwhile, then 60 more alone at 1.5 s
    assert wall["parallel x1"] == vae + 80 + 60 * 1.5
    # a UNet that ends first: the decoder's side-by-side time is the wall
    assert teacher_cost.project({**counts, "unet": {"unet": 10, "encode": 0}}, alone2, alone1, side)["parallel x1"] \
        == vae + 80


@pytest.mark.parametrize("kind", ["unet", "decoder"])
def test_teacher_cost_times_the_real_step_code(kind, host):
    import teacher_cost

    seconds = teacher_cost.time_kind(kind, 1)
    assert 0 < seconds < 120


def run_build_teacher(tmp_path, *extra):
    args = [a for a in TINY if a not in ("--threads", "0")]
    return subprocess.run(["bash", str(harness.REPO / "demo" / "build_teacher.sh"), *args, "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out"), *extra], env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_build_teacher_runs_each_phase_at_its_recorded_threads(tmp_path):
    """`make demo-model`'s schedule: VAE phases at 2 threads, then the UNet phases and the decoder phase
    side by side at 1 thread each (the shipped record's threads), assembled into --out."""
    proc = run_build_teacher(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "teacher_train.json").read_text())
    assert (record["vae_threads"], record["vae_focus_threads"], record["unet_threads"], record["decoder_threads"]) \
        == (2, 2, 1, 1)
    assert record["unet_more_cycles_run"]["unet_more_2"]["threads"] == 1
    weights(tmp_path / "out")


@pytest.mark.slow
def test_build_teacher_fails_when_the_decoder_phase_fails_and_keeps_the_unet(tmp_path):
    proc = run_build_teacher(tmp_path, "--decoder-init", str(tmp_path / "missing.safetensors"))
    assert proc.returncode != 0
    assert "the decoder phase failed" in proc.stderr and "rerun only the failed one" in proc.stderr
    assert (tmp_path / "w" / "unet_more_2.safetensors").is_file()  # the UNet side finished and is kept
    assert not (tmp_path / "out").exists()
