"""The adversarial TDD variant (docs/method.md §5.2) on the tiny host-class model (CPU): it trains, its
heads learn, exact resume and DDP equality hold with it on, and its discriminator sees the LoRA-off teacher."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import trainer_fixtures as fx

from trainer import adversarial
from trainer.algorithm import Cond, DiscreteSchedule
from trainer.checkpoint import ResumeError
from trainer.config import ConfigError
from trainer.lora import LoRANetwork
from trainer.lora_format import read_tdd_metadata
from trainer.loop import train
from trainer.models import from_components

pytestmark = pytest.mark.usefixtures("trainer_host")


def adv_cfg(train_images, tmp, **kw):
    return fx.train_config(train_images, tmp, adversarial=True, **kw)


@pytest.mark.parametrize("arch,channels", [("sdxl", [320, 640, 1280, 1280]),
                                           ("sd15", [320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320])])
def test_discriminator_features_of_full_size_unets(arch, channels):
    """SDXL: down levels + mid (320/640/1280/1280); SD1.5: 9 features including the up levels."""
    unet = fx.meta_model(arch).diffusion_model
    blocks = adversarial.feature_blocks(unet, arch)
    assert [adversarial.block_channels(b) for b in blocks] == channels


def test_resume_is_exact_with_adversarial(tiny_sd15, train_images, tmp_path):
    """4 steps straight == 2 steps + --resume 2 more (LoRA, heads, both optimisers); losses finite; the
    output names the variant."""
    kw = dict(max_steps=4, save_every=2, grad_accum=2, batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight = train(adv_cfg(train_images, tmp_path / "a", **kw), components=tiny_sd15)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]  # step 0 steps only the heads
    train(adv_cfg(train_images, tmp_path / "b", **dict(kw, max_steps=2)), components=tiny_sd15)
    second = train(adv_cfg(train_images, tmp_path / "b", resume=str(tmp_path / "b" / "run"), **kw), components=tiny_sd15)
    losses = straight["losses"]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)  # d (hinge, ~2 at start) and student losses
    assert abs(losses[0] - 2.0) < 0.5 and losses[1] < 0.5        # step 0: discriminator; step 1: student
    a = torch.load(tmp_path / "a" / "run" / "checkpoint-000004" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "checkpoint-000004" / "state.pt", weights_only=False)
    assert torch.allclose(fx.flat(a["discriminator"]), fx.flat(b["discriminator"]), atol=1e-7)
    assert a["disc_optimizer"]["state"] and a["disc_optimizer"]["param_groups"][0]["betas"] == (0.0, 0.999)
    la = fx.lora_tensors(tmp_path / "a" / "run" / "checkpoint-000004" / "lora.safetensors")
    lb = fx.lora_tensors(tmp_path / "b" / "run" / "checkpoint-000004" / "lora.safetensors")
    assert torch.allclose(fx.flat(la), fx.flat(lb), atol=1e-7)
    assert second["losses"] == pytest.approx(losses[2:], rel=1e-5)
    assert read_tdd_metadata(straight["out"])["tdd_method"] == "tdd-adv"


def test_resume_cannot_switch_adversarial(tiny_sd15, train_images, tmp_path):
    train(fx.train_config(train_images, tmp_path, max_steps=1), components=tiny_sd15)
    with pytest.raises(ResumeError, match="trained without --adversarial.*resume it without --adversarial"):
        train(adv_cfg(train_images, tmp_path, max_steps=2, resume=str(tmp_path / "run")), components=tiny_sd15)


def test_adversarial_needs_sd_teacher_and_target_method(train_images, tmp_path):
    sys.path.insert(0, str(fx.REPO / "tests"))
    import flux_fixtures as ff

    with pytest.raises(ConfigError, match="--adversarial supports SD1.5, SD2.x and SDXL.*drop --adversarial"):
        train(adv_cfg(train_images, tmp_path, resolution=ff.RESOLUTION), components=ff.tiny_flux(0))
    with pytest.raises(ConfigError, match="--adversarial needs --method tdd or tcd"):
        train(adv_cfg(train_images, tmp_path, method="lcm"), components=fx.tiny_sd15(0))


def _teacher_and_lora(tiny_sd15):
    teacher = from_components(*tiny_sd15)
    network = LoRANetwork(teacher.lora_targets(), rank=4, alpha=4, seed=0).attach()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, a in network.adapters():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.3)
    return teacher, network


def test_discriminator_sees_the_teacher_with_the_lora_off(tiny_sd15):
    teacher, network = _teacher_and_lora(tiny_sd15)
    try:
        disc = adversarial.Discriminator(teacher, network, seed=0)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([500, 300])
        ctx, _ = teacher.encode_text(["a red square", ""])
        cond = Cond(ctx)
        with torch.no_grad():
            feats_on = disc.features(z, t, cond)       # the LoRA is enabled on the network
            lora_out = teacher.x0(z, t, cond)
            network.detach_hooks()                     # the LoRA physically absent: the plain teacher
            feats_plain = disc.features(z, t, cond)
            plain_out = teacher.x0(z, t, cond)
        assert len(feats_on) == 5  # tiny SD1.5: 2 down levels, mid, 2 up levels
        assert not torch.allclose(lora_out, plain_out, atol=1e-4)  # the LoRA does change the model ...
        for a, b in zip(feats_on, feats_plain):                     # ... but not what the discriminator sees
            assert torch.equal(a, b)
    finally:
        network.detach_hooks()


def test_discriminator_heads_learn_real_from_fake(tiny_sd15):
    """On a fixed batch, the heads' accuracy on real (smooth latents) vs fake (the same, with a
    high-frequency pattern) rises from chance to > 0.9 with the reference's head optimiser."""
    teacher, network = _teacher_and_lora(tiny_sd15)
    try:
        disc = adversarial.Discriminator(teacher, network, seed=0)
        g = torch.Generator().manual_seed(0)
        real = torch.nn.functional.interpolate(torch.randn(8, 4, 2, 2, generator=g), size=(8, 8), mode="bilinear")
        checker = (torch.arange(8).view(-1, 1) + torch.arange(8).view(1, -1)) % 2 * 2 - 1.0
        fake = real + 0.5 * checker
        t = torch.full((8,), 200)
        ctx, _ = teacher.encode_text([""])
        cond = Cond(ctx.expand(8, -1, -1))
        opt = torch.optim.AdamW(disc.heads.parameters(), lr=1e-3, betas=adversarial.HEAD_BETAS,
                                weight_decay=adversarial.HEAD_WEIGHT_DECAY)

        def accuracy():
            with torch.no_grad():
                lf = torch.stack([o.mean((1, 2, 3)) for o in disc.logits(fake, t, cond)]).mean(0)
                lr = torch.stack([o.mean((1, 2, 3)) for o in disc.logits(real, t, cond)]).mean(0)
            return float(((lf < 0).float().mean() + (lr > 0).float().mean()) / 2)

        before = accuracy()
        for _ in range(30):
            loss = disc.d_loss(fake, real, t, cond)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        assert accuracy() > 0.9 and accuracy() > before
    finally:
        network.detach_hooks()


def test_renoise_and_gan_draws():
    """Re-noising from s to t_gan is the forward process (identity at t_gan = s); draws are per sample."""
    sigmas = ((1 - torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0))
              / torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)).sqrt()
    sched = DiscreteSchedule(sigmas)
    x = torch.randn(3, 4, 2, 2)
    s = torch.tensor([0, 100, 999])
    n = torch.randn(3, 4, 2, 2)
    assert torch.allclose(adversarial.renoise(x, s, s, n, sched), x, atol=1e-6)
    t_gan, nf, nr = adversarial.draw_gan(0, [5, 6, 7], s, (4, 2, 2))
    assert all(int(a) <= int(b) < min(int(a) + 250, 1000) for a, b in zip(s, t_gan))
    assert not torch.equal(nf, nr)
    t2, nf2, _ = adversarial.draw_gan(0, [6], s[1:2], (4, 2, 2))
    assert int(t2[0]) == int(t_gan[1]) and torch.equal(nf2[0], nf[1])  # a function of (seed, global index)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_adversarial(train_images, tmp_path):
    """2 gloo processes x batch 1 == 1 process x batch 2 with --adversarial (a discriminator and a student step)."""
    args = fx.tiny_args(train_images, tmp_path / "ddp", "--max-steps", "2", "--batch-size", "1", "--adversarial")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(fx.REPO / "trainer" / "distill.py"), *args]
    p = subprocess.run(cmd, env=fx.subprocess_env(), capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    single = train(adv_cfg(train_images, tmp_path / "one", max_steps=2), components=fx.tiny_sd15(0))
    ddp = [float(r["loss"]) for r in fx.read_log(tmp_path / "ddp" / "run")]
    assert torch.allclose(torch.tensor(ddp), torch.tensor(single["losses"]), rtol=1e-3, atol=1e-6)
    a = torch.load(tmp_path / "ddp" / "run" / "checkpoint-000002" / "state.pt", weights_only=False)["discriminator"]
    b = torch.load(tmp_path / "one" / "run" / "checkpoint-000002" / "state.pt", weights_only=False)["discriminator"]
    assert float((fx.flat(a) - fx.flat(b)).norm()) <= 1e-3 * float(fx.flat(a).norm())


@pytest.mark.slow
def test_cli_sdxl_adv_preset_lora_loads_in_the_stock_loader(train_images, tmp_path):
    """The held-out-style check at tiny scale: the CLI with --adversarial --preset sdxl-adv, overriding only
    steps, batch and resolution, on an SDXL-class teacher; its LoRA (rank 64 / alpha 8 from the preset)
    loads in the host's stock LoRA path with every module matched and names the variant. (The full-size
    SDXL module set, 788, is checked on the meta-device architecture in test_trainer_lora.py.)"""
    import comfy.sd
    import comfy.utils

    from trainer.distill import main
    from trainer.models import lora_targets

    out = tmp_path / "adv.safetensors"
    rc = main(["--teacher", f"{fx.REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sdxl", "--adversarial",
               "--preset", "sdxl-adv", "--data", str(train_images), "--out", str(out), "--run-dir", str(tmp_path / "run"),
               "--max-steps", "2", "--batch-size", "1", "--accumulate-to", "1", "--resolution", str(fx.RESOLUTION),
               "--device", "cpu", "--no-progress", "--num-workers", "0", "--no-calibrate"])
    assert rc == 0
    meta = read_tdd_metadata(out)
    assert meta["tdd_method"] == "tdd-adv" and meta["tdd_base_arch"] == "sdxl"
    patcher = fx.tiny_sdxl()[0]
    lora_sd = comfy.utils.load_torch_file(str(out))
    assert {k.rsplit(".", 1)[0] for k in lora_sd if k.endswith("alpha")} and all(
        float(v) == 8.0 for k, v in lora_sd.items() if k.endswith("alpha"))
    m2, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0.0)
    assert len(m2.patches) == len(lora_targets(patcher.model)) == len(lora_sd) // 3
