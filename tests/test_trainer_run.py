"""End-to-end trainer runs on the tiny host-class model (CPU): CLI outputs, resume, SIGTERM, torchrun
DDP, data paths, eps/v/SDXL teachers."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainer_fixtures as fx

from trainer.distill import main
from trainer.lora_format import read_tdd_metadata
from trainer.loop import train

pytestmark = pytest.mark.usefixtures("trainer_host")


REPO = fx.REPO
PY = sys.executable


cfg, read_log, lora_tensors, _env = fx.train_config, fx.read_log, fx.lora_tensors, fx.subprocess_env


def test_cli_end_to_end(train_images, tmp_path):
    """distill.py flags -> a kohya LoRA with tdd_ metadata, CSV log, validation grid, checkpoint."""
    import comfy.lora

    rc = main(fx.tiny_args(train_images, tmp_path, "--validate-every", "2", "--method", "tdd", "--kmin", "4", "--kmax", "6"))
    assert rc == 0
    out = tmp_path / "lora.safetensors"
    meta = read_tdd_metadata(out)
    assert meta["tdd_base_arch"] == "sd15" and meta["tdd_method"] == "tdd"
    assert (meta["tdd_kmin"], meta["tdd_kmax"], meta["tdd_training_steps"]) == (4, 6, 2)
    assert (meta["tdd_recommended_steps"], meta["tdd_recommended_eta"], meta["tdd_recommended_guidance"]) == (4, 0.2, 1.7)
    sd = lora_tensors(out)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    assert sd[next(k for k in sd if k.endswith("lora_up.weight"))].dtype == torch.float16  # --save-dtype fp16
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # it trained
    model = fx.tiny_sd15(0)[0].model
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    assert not [k for k in sd if k.rsplit(".", 2 if k.endswith("weight") else 1)[0] not in key_map]
    rows = read_log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "validation" / "step_000002.png")
    assert grid.size == (2 * fx.RESOLUTION, 2 * fx.RESOLUTION)  # 2 prompts x (4 and 8 steps)
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-000002"


@pytest.mark.parametrize("method", ["tcd", "lcm"])
def test_other_methods_train(tiny_sd15, train_images, tmp_path, method):
    r = train(cfg(train_images, tmp_path, method=method, max_steps=1), components=tiny_sd15)
    assert r["status"] == "done" and all(0 < x < 10 for x in r["losses"])
    assert read_tdd_metadata(r["out"])["tdd_method"] == method


def test_resume_continues_exactly(tiny_sd15, train_images, tmp_path):
    """2N steps straight == N steps, then --resume for N more (weights and loss curve)."""
    straight = train(cfg(train_images, tmp_path / "a", max_steps=4, save_every=2, grad_accum=2, batch_size=1,
                         lr_schedule="warmup", warmup_steps=3), components=tiny_sd15)
    first = train(cfg(train_images, tmp_path / "b", max_steps=2, save_every=2, grad_accum=2, batch_size=1,
                      lr_schedule="warmup", warmup_steps=3), components=tiny_sd15)
    second = train(cfg(train_images, tmp_path / "b", max_steps=4, save_every=2, grad_accum=2, batch_size=1,
                       lr_schedule="warmup", warmup_steps=3, resume=str(tmp_path / "b" / "run" / "checkpoint-000002")),
                   components=tiny_sd15)
    assert first["step"] == 2 and second["step"] == 4
    assert torch.allclose(torch.tensor(first["losses"] + second["losses"]), torch.tensor(straight["losses"]), rtol=1e-5)
    a = lora_tensors(tmp_path / "a" / "run" / "checkpoint-000004" / "lora.safetensors")
    b = lora_tensors(tmp_path / "b" / "run" / "checkpoint-000004" / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k
    assert [int(r["step"]) for r in read_log(tmp_path / "b" / "run")] == [1, 2, 3, 4]


def test_grad_accumulation_matches_bigger_batch(tiny_sd15, train_images, tmp_path):
    big = train(cfg(train_images, tmp_path / "a", batch_size=2, grad_accum=1), components=tiny_sd15)
    acc = train(cfg(train_images, tmp_path / "b", batch_size=1, grad_accum=2, num_workers=2), components=tiny_sd15)
    assert torch.allclose(torch.tensor(big["losses"]), torch.tensor(acc["losses"]), rtol=1e-4, atol=1e-7)


def assert_same_run(multi: Path, one: Path, single_losses) -> None:
    """The 3-step multi-process run in ``multi`` equals the single-process one in ``one``: the same loss
    curve, and the same LoRA at step 3. Adam normalises gradients, so float noise between batched and
    split forwards in near-zero-gradient entries moves them by ~lr either way: the whole LoRA is
    compared, not entry by entry."""
    losses = [float(r["loss"]) for r in read_log(multi / "run")]
    assert torch.allclose(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-3, atol=1e-6)
    a = lora_tensors(multi / "run" / "checkpoint-000003" / "lora.safetensors")
    b = lora_tensors(one / "run" / "checkpoint-000003" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert float((fx.flat(a) - fx.flat(b)).norm()) <= 1e-2 * float(fx.flat(a).norm())


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one(train_images, tmp_path):
    """2 CPU processes (gloo) with batch 1 each == 1 process with batch 2: same loss curve and weights."""
    args = fx.tiny_args(train_images, tmp_path / "ddp", "--max-steps", "3", "--batch-size", "1", "--save-every", "3")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "trainer" / "distill.py"), *args]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stderr
    single = train(cfg(train_images, tmp_path / "one", max_steps=3, batch_size=2, save_every=3), components=fx.tiny_sd15(0))
    assert_same_run(tmp_path / "ddp", tmp_path / "one", single["losses"])


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one(train_images, tmp_path):
    """--fsdp (the frozen base sharded with FSDP2's fully_shard), with gradient checkpointing as a large
    family needs it, on 2 CPU processes (gloo), batch 1 each == 1 unsharded process with batch 2: the
    same loss curve and weights; each process held half the base;
    validation and calibration (whose model calls are collective when sharded) ran and rank 0 wrote them."""
    import json

    from trainer.lora_format import read_header_metadata

    args = fx.tiny_args(train_images, tmp_path / "fsdp", "--max-steps", "3", "--batch-size", "1", "--save-every", "3",
                        "--fsdp", "--gradient-checkpointing", "--validate-every", "3", "--calibrate")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "trainer" / "distill.py"), *args]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the frozen base is sharded over 2 processes" in p.stderr, p.stderr[-3000:]
    single = train(cfg(train_images, tmp_path / "one", max_steps=3, batch_size=2, save_every=3, calibrate=True),
                   components=fx.tiny_sd15(0))
    assert_same_run(tmp_path / "fsdp", tmp_path / "one", single["losses"])
    assert (tmp_path / "fsdp" / "run" / "validation" / "step_000003.png").is_file()
    sharded, one = (json.loads(read_header_metadata(path)["tdd_calibration"]) for path in
                    (tmp_path / "fsdp" / "lora.safetensors", single["out"]))
    assert (sharded["prompts"], sharded["evaluations"], sharded["best"].keys()) == (
        one["prompts"], one["evaluations"], one["best"].keys())


@pytest.mark.slow
def test_sigterm_during_a_sharded_calibration_stops_every_process(train_images, tmp_path):
    """--fsdp: each calibration model call gathers weights from both processes, so a stop must be taken
    at the same evaluation by both (they agree first): SIGTERM to torchrun during calibration ends
    both within seconds, cleanly, with the last step's checkpoint and no LoRA."""
    args = fx.tiny_args(train_images, tmp_path, "--batch-size", "1", "--fsdp", "--calibrate",
                        "--calibrate-prompts", "256", "--progress")
    _, delay, text = fx.stop_while_calibrating([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                "2", str(REPO / "trainer" / "distill.py"), *args],
                                               tmp_path, signal.SIGTERM)
    assert "stopped while calibrating" in text, text[-3000:]
    assert delay < 10.0, f"{delay:.1f} s from SIGTERM to torchrun's exit"
    assert not (tmp_path / "lora.safetensors").exists()
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoint-000002"


def test_fsdp_without_torchrun_is_refused(train_images, tmp_path, tiny_sd15):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="--fsdp shards the frozen model over several processes: run the trainer "
                                          "under torchrun"):
        train(cfg(train_images, tmp_path, fsdp=True), components=tiny_sd15)


@pytest.mark.slow
def test_torchrun_two_nodes_over_a_loopback_rendezvous_match_one_process(train_images, tmp_path):
    """Multi-node as torchrun runs it: 2 "nodes" (separate torchrun launchers, node_rank 0 and 1,
    one process each) meeting at a c10d rendezvous on 127.0.0.1 == 1 process at the same global batch.
    Only global rank 0 writes (both nodes get the same --out/--run-dir, as on a shared filesystem)."""
    from harness import free_port

    args = fx.tiny_args(train_images, tmp_path / "nodes", "--max-steps", "3", "--batch-size", "1", "--save-every", "3")
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = [subprocess.Popen(
        [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "tdd-test",
         str(REPO / "trainer" / "distill.py"), *args],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path) for node in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in launchers]
    for p, err in zip(launchers, errs):
        assert p.returncode == 0, err[-3000:]
    assert any("2 process(es)" in err for err in errs)
    single = train(cfg(train_images, tmp_path / "one", max_steps=3, batch_size=2, save_every=3), components=fx.tiny_sd15(0))
    node_losses = [float(r["loss"]) for r in read_log(tmp_path / "nodes" / "run")]
    assert torch.allclose(torch.tensor(node_losses), torch.tensor(single["losses"]), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(train_images, tmp_path, tiny_sd15):
    args = fx.tiny_args(train_images, tmp_path, "--max-steps", "10000", "--save-every", "10000", "--batch-size", "1")
    p = subprocess.Popen([PY, str(REPO / "trainer" / "distill.py"), *args], env=_env(), stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    log_csv = tmp_path / "run" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if log_csv.is_file() and len(log_csv.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()[-3000:]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "received SIGTERM" in err and "--resume" in err
    ckpt = tmp_path / "run" / (tmp_path / "run" / "latest").read_text()
    step = int(ckpt.name.split("-")[1])
    assert step >= 2 and not (tmp_path / "lora.safetensors").exists()  # no partial final LoRA
    assert not list((tmp_path / "run").glob(".checkpoint-*"))  # nothing half-written left
    r = train(cfg(train_images, tmp_path, max_steps=step + 1, batch_size=1, save_every=10000,
                  resume=str(tmp_path / "run")), components=tiny_sd15)
    assert r["status"] == "done" and r["step"] == step + 1 and len(r["losses"]) == 1
    assert [int(x["step"]) for x in read_log(tmp_path / "run")] == list(range(1, step + 2))  # no duplicate rows


def test_jsonl_cache_and_undecodable_images(tiny_sd15, tmp_path):
    jsonl = fx.make_images(tmp_path / "d", 4, jsonl=True)
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = (tmp_path / "d" / "img_000.png").read_bytes()
    (tmp_path / "d" / "truncated.png").write_bytes(good[: len(good) // 2])
    with open(jsonl, "a") as f:
        f.write('{"path": "broken.png", "caption": "x"}\n{"path": "truncated.png", "caption": "y"}\n')
    cache = tmp_path / "cache"
    r = train(cfg(jsonl, tmp_path, cache_dir=str(cache), max_steps=2), components=tiny_sd15)
    assert r["status"] == "done" and r["skipped_images"] == 2
    assert len(list(cache.glob("*.safetensors"))) == 4
    # a second run reads the cache instead of re-encoding
    from trainer.models import Teacher
    calls = []
    orig = Teacher.encode_posterior
    Teacher.encode_posterior = lambda self, px: (calls.append(1), orig(self, px))[1]
    try:
        r2 = train(cfg(jsonl, tmp_path / "again", cache_dir=str(cache), max_steps=1), components=tiny_sd15)
    finally:
        Teacher.encode_posterior = orig
    assert r2["status"] == "done" and calls == []


@pytest.mark.parametrize("factory", ["tiny_sd2v", "tiny_sdxl"])
def test_v_prediction_and_sdxl_teachers(train_images, tmp_path, factory):
    comps = getattr(fx, factory)()
    r = train(cfg(train_images, tmp_path, max_steps=1), components=comps)
    assert r["status"] == "done" and 0 < r["losses"][0] < 10
    arch = {"tiny_sd2v": "sd2x", "tiny_sdxl": "sdxl"}[factory]
    assert read_tdd_metadata(r["out"])["tdd_base_arch"] == arch


def test_seam_converts_v_prediction_to_x0():
    """Teacher.x0 on a v model == a_t z - s_t v (the host's conversion), at the discrete timestep t."""
    from trainer.algorithm import Cond, DiscreteSchedule
    from trainer.models import from_components

    teacher = from_components(*fx.tiny_sd2v(0))
    assert teacher.prediction == "v"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700, 20])
    ctx, _ = teacher.encode_text(["a", "b"])
    x0 = teacher.x0(z, t, Cond(ctx))
    v = teacher.unet(z, t.float(), context=ctx)
    a, s = DiscreteSchedule(teacher.sigmas).coeffs(t, z)
    assert torch.allclose(x0, a * z - s * v, atol=1e-4)


def test_gradient_checkpointing_gives_same_result(train_images, tmp_path, tiny_sd15):
    plain = train(cfg(train_images, tmp_path / "a"), components=tiny_sd15)
    ckpt = train(cfg(train_images, tmp_path / "b", gradient_checkpointing=True), components=fx.tiny_sd15(0))
    assert torch.allclose(torch.tensor(plain["losses"]), torch.tensor(ckpt["losses"]), rtol=1e-5)
    a, b = lora_tensors(plain["out"]), lora_tensors(ckpt["out"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_recomputes_the_unet_layers():
    """Backward re-runs the checkpointed layers' insides: the UNet's convs and linears run about twice as
    often per forward+backward with checkpointing as without (the host calls each block's layers directly,
    so wrapping the blocks themselves would do nothing)."""
    from trainer.algorithm import Cond
    from trainer.lora import enable_gradient_checkpointing
    from trainer.models import from_components

    def calls_per_step(checkpointing: bool) -> int:
        teacher = from_components(*fx.tiny_sd15(0))
        if checkpointing:
            enable_gradient_checkpointing(teacher.checkpoint_blocks())
        count = [0]
        for m in teacher.unet.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        z = torch.randn(1, 4, 8, 8, requires_grad=True)
        ctx, _ = teacher.encode_text(["a"])
        teacher.x0(z, torch.tensor([500]), Cond(ctx)).sum().backward()
        return count[0]

    plain, ckpt = calls_per_step(False), calls_per_step(True)
    assert 1.7 * plain < ckpt <= 2 * plain


def test_bf16_autocast_on_cpu(train_images, tmp_path, tiny_sd15):
    r = train(cfg(train_images, tmp_path, precision="bf16", max_steps=1), components=tiny_sd15)
    assert r["status"] == "done" and 0 < r["losses"][0] < 10


class HostCancel(Exception):
    """What a host raises inside the model to cancel (ComfyUI: InterruptProcessingException)."""


def test_host_cancel_mid_step_checkpoints_the_last_step_and_resumes_exactly(tiny_sd15, train_images, tmp_path):
    """An exception of ``interrupts`` raised inside the model during step 3 drops that step, saves the
    checkpoint of step 2, returns "interrupted"; the resume equals an uninterrupted run. ``on_step``
    sees every completed step's row."""
    settings = dict(max_steps=4, save_every=100, batch_size=1, lr_schedule="warmup", warmup_steps=3)
    straight = train(cfg(train_images, tmp_path / "a", **settings), components=tiny_sd15)
    rows, calls = [], {"n": 0}
    unet = tiny_sd15[0].model.diffusion_model

    def cancel_in_step_3(module, args):
        calls["n"] += 1
        if len(rows) == 2 and calls["n"] > 1:  # inside step 3, after some layers ran
            raise HostCancel()

    hook = unet.register_forward_pre_hook(cancel_in_step_3)
    try:
        first = train(cfg(train_images, tmp_path / "b", **settings), components=tiny_sd15,
                      on_step=lambda run, row: rows.append(row["step"]), interrupts=(HostCancel,))
    finally:
        hook.remove()
    assert first["status"] == "interrupted" and first["step"] == 2 and rows == [1, 2]
    assert first["checkpoint"].endswith("checkpoint-000002") and first["out"] is None
    assert not (tmp_path / "b" / "lora.safetensors").exists()
    second = train(cfg(train_images, tmp_path / "b", **settings, resume=str(tmp_path / "b" / "run")),
                   components=tiny_sd15)
    assert torch.allclose(torch.tensor(first["losses"] + second["losses"]), torch.tensor(straight["losses"]), rtol=1e-5)
    a, b = lora_tensors(tmp_path / "a" / "lora.safetensors"), lora_tensors(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["step"]) for r in read_log(tmp_path / "b" / "run")] == [1, 2, 3, 4]
