"""Bad input gives clear errors that name the problem and the fix (exit status 2 from the CLI)."""
from __future__ import annotations

import logging

import pytest
import torch

import trainer_fixtures as fx

from trainer.checkpoint import ResumeError
from trainer.config import TrainConfig
from trainer.data import DataError
from trainer.distill import main
from trainer.loop import train
from trainer.models import TeacherError, load_teacher

pytestmark = pytest.mark.usefixtures("trainer_host")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fx.make_images(tmp_path_factory.mktemp("data"), 3)


def run_cli(args, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trainer"):
        rc = main(args)
    return rc, " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_missing_teacher(images, tmp_path, caplog):
    rc, msg = run_cli(["--teacher", str(tmp_path / "nope.safetensors"), "--data", str(images)], caplog)
    assert rc == 2 and "teacher checkpoint not found" in msg and "--teacher" in msg


def test_corrupt_teacher(images, tmp_path, caplog):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    rc, msg = run_cli(["--teacher", str(bad), "--data", str(images), "--device", "cpu"], caplog)
    assert rc == 2 and "could not read teacher checkpoint" in msg and "corrupt" in msg and "download it again" in msg


def test_not_a_model_checkpoint(tmp_path):
    from safetensors.torch import save_file
    lora = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(TeacherError, match="can't recognise it as a diffusion model checkpoint.*full SD1.5"):
        load_teacher(str(lora), device="cpu")


def test_bad_factory(tmp_path):
    with pytest.raises(TeacherError, match="has no function 'nope'"):
        load_teacher(f"{fx.REPO / 'tests' / 'trainer_fixtures.py'}:nope", device="cpu")


@pytest.mark.parametrize("case,pattern", [
    ("missing", "training data not found"),
    ("empty", "no usable training images"),
    ("nocaption", r"have no caption file \(e.g. img_000.png.*add a same-named .txt"),
    ("file", "neither a folder nor a .jsonl"),
    ("badjsonl", r"data.jsonl:2 \(img_001.png\) has no \"caption\""),
    ("allbroken", r"no usable training images .*\(2 undecodable\)"),
])
def test_bad_data(tmp_path, case, pattern):
    from trainer.data import scan
    d = tmp_path / "d"
    if case == "empty":
        d.mkdir()
    elif case == "nocaption":
        fx.make_images(d, 2, captions=False)
    elif case == "file":
        d.write_text("x")
    elif case == "badjsonl":
        d = fx.make_images(d, 2, jsonl=True)
        d.write_text('{"path": "img_000.png", "caption": "a"}\n{"path": "img_001.png"}\n')
    elif case == "allbroken":
        d.mkdir()
        for n in ("a", "b"):
            (d / f"{n}.png").write_bytes(b"not an image")
            (d / f"{n}.txt").write_text("c")
    with pytest.raises(DataError, match=pattern):
        scan(d)


def test_bad_data_via_cli(tmp_path, caplog):
    rc, msg = run_cli(fx.tiny_args(tmp_path / "missing", tmp_path), caplog)
    assert rc == 2 and "training data not found" in msg


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    r = train(TrainConfig(data=str(images), out=str(tmp / "l.safetensors"), run_dir=str(tmp / "run"), resolution=64,
                          rank=4, alpha=2, max_steps=1, batch_size=1, device="cpu", progress=False, num_workers=0,
                          calibrate=False),
              components=fx.tiny_sd15(0))
    return tmp / "run", r


def _resume_cfg(images, tmp_path, run_dir, **kw):
    base = dict(data=str(images), out=str(tmp_path / "l.safetensors"), run_dir=str(tmp_path / "r"), resolution=64,
                rank=4, alpha=2, max_steps=2, batch_size=1, device="cpu", progress=False, num_workers=0,
                resume=str(run_dir), calibrate=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_with_other_settings(images, tmp_path, finished_run):
    run_dir, _ = finished_run
    with pytest.raises(ResumeError, match=r"another run \(different settings\): method: checkpoint 'tdd' vs now 'lcm'"
                                          r".*start a fresh run"):
        train(_resume_cfg(images, tmp_path, run_dir, method="lcm"), components=fx.tiny_sd15(0))


def test_resume_with_other_base_model(images, tmp_path, finished_run):
    run_dir, _ = finished_run
    with pytest.raises(ResumeError, match=r"different base model \(teacher\).*original teacher"):
        train(_resume_cfg(images, tmp_path, run_dir), components=fx.tiny_sd15(1))


def test_resume_from_something_else(images, tmp_path, caplog):
    (tmp_path / "junk").mkdir()
    rc, msg = run_cli(fx.tiny_args(images, tmp_path, "--resume", str(tmp_path / "junk")), caplog)
    assert rc == 2 and "not a TDD trainer checkpoint" in msg
    rc, msg = run_cli(fx.tiny_args(images, tmp_path, "--resume", str(tmp_path / "nowhere")), caplog)
    assert rc == 2 and "no such folder" in msg


def test_bad_flags(images, tmp_path, caplog):
    rc, msg = run_cli(fx.tiny_args(images, tmp_path, "--eta-max", "2"), caplog)
    assert rc == 2 and "--eta-max must be in [0, 1]" in msg
    with pytest.raises(SystemExit):  # argparse: unknown choice
        main(fx.tiny_args(images, tmp_path, "--method", "pcm"))
