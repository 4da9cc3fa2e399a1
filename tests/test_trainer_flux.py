"""FLUX.1 (flow-matching) distillation, docs/method.md §5.1: the flow step, the module set on the full
FLUX.1-dev architecture (meta device), and runs on a reduced FLUX built from the host's FLUX classes."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import flux_fixtures as ff
import trainer_fixtures as fx

from trainer.algorithm import Cond, SampleDraws, TargetSampler, draw_batch
from trainer.checkpoint import ResumeError
from trainer.config import ConfigError, TrainConfig, parse_args
from trainer.distill import main
from trainer.flow import FLUX_DEFAULTS, FlowSchedule, flow_sigmas
from trainer.lora import LoRANetwork
from trainer.lora_format import read_header_metadata, read_tdd_metadata
from trainer.loop import train
from trainer.families.targets import peft_file_keys
from trainer.models import Teacher, TeacherError, flux_lora_targets, from_components, load_teacher

pytestmark = pytest.mark.usefixtures("trainer_host")
tensors = fx.lora_tensors
FACTORY = f"{fx.REPO / 'tests' / 'flux_fixtures.py'}:tiny_flux"


@pytest.fixture(scope="module")
def flux():
    return ff.tiny_flux(0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fx.make_images(tmp_path_factory.mktemp("fluxdata"), 4, size=(80, 64))


def cfg(data, tmp, **kw) -> TrainConfig:
    """:func:`trainer_fixtures.train_config` at the reduced FLUX's resolution."""
    return fx.train_config(data, tmp, **{"resolution": ff.RESOLUTION, **kw})


# ---------------------------------------------------------------------------------------------
# the flow step against §5.1 (pure torch)
# ---------------------------------------------------------------------------------------------
def test_flow_sigmas_and_targets():
    sig = flow_sigmas()
    assert sig.shape == (1000,) and sig[0] == 0.001 and sig[999] == 1.0
    k = torch.arange(1000)
    assert torch.equal(sig, (k + 1).double() / 1000)          # sigma(k) = (k + 1) / 1000, no shift
    sampler = TargetSampler("tdd")                             # same grid and target set as SD, on k
    assert len(sampler.grid) == 250 and sampler.grid[0] == 3 and sampler.grid[-1] == 999
    assert sampler.targets.tolist() == [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627,
                                        667, 715, 751, 799, 835, 859, 875]
    d = draw_batch(sampler, 0, range(64), (16, 2, 2), 0.0)
    assert bool((d.s <= d.t_prev).all()) and bool((d.t_prev == (d.t - 4).clamp(min=0)).all())


def test_flow_teacher_step_student_move_and_guidance_draw():
    sched = FlowSchedule()
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 16, 2, 2, generator=g), torch.randn(3, 16, 2, 2, generator=g)
    t, t_prev, s = torch.tensor([999, 503, 7]), torch.tensor([995, 499, 3]), torch.tensor([875, 431, 0])
    sig = lambda k: ((k + 1).float() / 1000).view(-1, 1, 1, 1)  # noqa: E731
    x_t = sched.noised(x0, n, t)
    assert torch.allclose(x_t, (1 - sig(t)) * x0 + sig(t) * n)
    v = torch.randn(x_t.shape, generator=g)                     # any velocity; the host returns x0 = x - sigma v
    teacher = lambda x, tt, c: x - sig(tt) * v  # noqa: E731
    calls = []
    counted = lambda x, tt, c: (calls.append(len(x)), teacher(x, tt, c))[1]  # noqa: E731
    step = sched.teacher_step(counted, x_t, t, t_prev, None, None, 3.5)
    assert calls == [3]                                          # one pass, no uncond branch, no CFG
    assert torch.allclose(step, x_t + (sig(t_prev) - sig(t)) * v, atol=1e-6)      # one Euler step t -> t'
    moved = sched.move_to(x_t, teacher(x_t, t, None), t, s)
    assert torch.allclose(moved, x_t + (sig(s) - sig(t)) * v, atol=1e-6)          # student move to s
    cond = Cond(torch.zeros(3, 4, 8), torch.zeros(3, 8), torch.full((3,), 1.5))
    draws = SampleDraws(t, t_prev, s, torch.zeros(3, dtype=torch.bool), n, torch.tensor([0.0, 0.5, 1.0]))
    assert FlowSchedule().condition(cond, draws).guidance.tolist() == [1.5] * 3   # constant guidance
    assert FlowSchedule((0, 3)).condition(cond, draws).guidance.tolist() == [0.0, 1.5, 3.0]


# ---------------------------------------------------------------------------------------------
# FLUX.1-dev's module set (meta device) and the file's keys in the host's key map
# ---------------------------------------------------------------------------------------------
def test_flux_dev_module_set_and_every_key_maps():
    import comfy.lora

    model = ff.meta_flux_dev()
    targets, paths = flux_lora_targets(model)
    assert len(targets) == 267                                   # 19 x 6 + 38 x 4 + 1, as the release
    kinds = sorted({p.split(".", 2)[-1] if "blocks" in p else p for p in paths.values()})
    assert kinds == ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2", "proj_out"]
    network = LoRANetwork(targets, rank=2, alpha=1)
    keys = peft_file_keys(network.kohya_state_dict(), paths)  # the FLUX row's file naming
    assert len(keys) == 3 * 267 and all(k.startswith("transformer.") for k in keys)
    assert {".".join(k.split(".")[-2:]) if k.endswith("weight") else "alpha" for k in keys} == \
        {"lora_A.weight", "lora_B.weight", "alpha"}
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert sorted(m for m in modules if m not in key_map) == []
    # q, k, v land on their slices of the fused layers; the rest on whole layers
    assert key_map["transformer.transformer_blocks.3.attn.to_k"] == (
        "diffusion_model.double_blocks.3.img_attn.qkv.weight", (0, 3072, 3072))
    assert key_map["transformer.single_transformer_blocks.5.attn.to_v"] == (
        "diffusion_model.single_blocks.5.linear1.weight", (0, 6144, 3072))
    assert key_map["transformer.proj_out"] == "diffusion_model.final_layer.linear.weight"
    assert targets["lora_transformer_single_transformer_blocks_5_attn_to_v"].pad == (6144, 21504 - 9216)


# ---------------------------------------------------------------------------------------------
# the reduced FLUX
# ---------------------------------------------------------------------------------------------
def test_loss_falls_on_a_fixed_batch(flux):
    teacher = from_components(*flux)
    px = torch.rand(2, 3, ff.RESOLUTION, ff.RESOLUTION, generator=torch.Generator().manual_seed(1))
    x0 = teacher.encode_images(px)
    ctx, pooled = teacher.encode_text(["a red square", "a blue circle"])
    cond = teacher.make_cond(ctx, pooled, ff.RESOLUTION, ff.RESOLUTION)
    losses = fx.fixed_batch_losses(teacher, x0, cond, cond, steps=8, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses


def test_cli_trains_reduced_flux(images, tmp_path):
    """distill.py on the reduced FLUX: FLUX defaults, PEFT keys with alpha, flux metadata, a flow-space
    validation grid through the TDD sampler."""
    rc = main(["--teacher", FACTORY, "--data", str(images), "--out", str(tmp_path / "lora.safetensors"),
               "--run-dir", str(tmp_path / "run"), "--resolution", str(ff.RESOLUTION), "--rank", "4", "--alpha", "2",
               "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress", "--num-workers", "0",
               "--validate-every", "2", "--flux-guidance-range", "0", "3", "--calibrate-prompts", "2"])
    assert rc == 0
    # calibrated in FLUX's terms: the guidance embedding swept, one pass per step, 8 steps recommended
    table = json.loads(read_header_metadata(tmp_path / "lora.safetensors")["tdd_calibration"])
    assert table["prompts"] == 2 and {row[1] for row in table["scores"]} <= {1.5, 2.0, 2.5, 3.0, 3.5}
    assert "8" in table["best"] and "guidance 3.5" in table["reference"]
    run = json.loads((tmp_path / "run" / "checkpoint-000002" / "run.json").read_text())
    fields = run["fingerprint_fields"]
    assert (fields["loss"], fields["lr"], fields["weight_decay"], fields["empty_prompt_prob"]) == ("l2", 1e-4, 1e-2, 0.0)
    assert fields["flux_guidance_range"] == [0.0, 3.0]
    sd = tensors(tmp_path / "lora.safetensors")
    assert len(sd) == 3 * 21 and all(k.startswith("transformer.") for k in sd)
    assert float(sd["transformer.proj_out.alpha"]) == 2.0
    meta = read_tdd_metadata(tmp_path / "lora.safetensors")
    assert meta["tdd_base_arch"] == "flux" and meta["tdd_method"] == "tdd"
    assert (meta["tdd_recommended_steps"], meta["tdd_recommended_guidance"]) == (8, table["best"]["8"]["guidance"])
    assert (tmp_path / "run" / "validation" / "step_000002.png").is_file()


def test_resume_is_exact(flux, images, tmp_path):
    kw = dict(save_every=2, batch_size=1, grad_accum=2, lr=1e-3)
    straight = train(cfg(images, tmp_path / "a", max_steps=4, **kw), components=flux)
    first = train(cfg(images, tmp_path / "b", max_steps=2, **kw), components=flux)
    second = train(cfg(images, tmp_path / "b", max_steps=4, resume=str(tmp_path / "b" / "run"), **kw), components=flux)
    assert torch.allclose(torch.tensor(first["losses"] + second["losses"]), torch.tensor(straight["losses"]), rtol=1e-5)
    a = tensors(tmp_path / "a" / "run" / "checkpoint-000004" / "lora.safetensors")
    b = tensors(tmp_path / "b" / "run" / "checkpoint-000004" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one(images, tmp_path, flux):
    """2 CPU processes (gloo) with batch 1 each == 1 process with batch 2: same losses and LoRA."""
    args = ["--teacher", FACTORY, "--data", str(images), "--out", str(tmp_path / "ddp" / "l.safetensors"),
            "--run-dir", str(tmp_path / "ddp" / "run"), "--resolution", str(ff.RESOLUTION), "--rank", "4",
            "--alpha", "2", "--lr", "1e-3", "--max-steps", "2", "--batch-size", "1", "--save-every", "2",
            "--device", "cpu", "--no-progress", "--num-workers", "0", "--no-calibrate"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(fx.REPO / "trainer" / "distill.py"), *args]
    p = subprocess.run(cmd, env=fx.subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    single = train(cfg(images, tmp_path / "one", max_steps=2, batch_size=2, save_every=2), components=flux)
    ddp_losses = [float(r["loss"]) for r in fx.read_log(tmp_path / "ddp" / "run")]
    assert torch.allclose(torch.tensor(ddp_losses), torch.tensor(single["losses"]), rtol=1e-3, atol=1e-6)
    a = tensors(tmp_path / "ddp" / "run" / "checkpoint-000002" / "lora.safetensors")
    b = tensors(tmp_path / "one" / "run" / "checkpoint-000002" / "lora.safetensors")
    flat = fx.flat
    assert float((flat(a) - flat(b)).norm()) <= 1e-2 * float(flat(a).norm())


def _trained_like_lora(teacher, path):
    """A LoRA file from the trainer's network with random ups (as if trained), as distill.py writes it."""
    from trainer.lora_format import atomic_save_safetensors, build_metadata
    network = LoRANetwork(teacher.lora_targets(), rank=4, alpha=2, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, a in network.adapters():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.3)
    meta = build_metadata(base_arch="flux", method="tdd", kmin=4, kmax=8, training_steps=1, rank=4, alpha=2)
    atomic_save_safetensors(teacher.lora_file_keys(network.kohya_state_dict(torch.float32)), path, meta)
    return network


def test_stock_and_tdd_lora_loaders_apply_the_stored_alpha(flux, tmp_path):
    import comfy.sd
    import comfy.utils
    import harness

    patcher = flux[0]
    teacher = from_components(*flux)
    path = tmp_path / "flux_tdd.safetensors"
    network = _trained_like_lora(teacher, path)
    lora = comfy.utils.load_torch_file(str(path))
    m2, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)    # stock LoraLoader(ModelOnly)
    assert sum(len(v) for v in m2.patches.values()) == 21                  # every one of the 21 modules matched
    assert len(m2.patches) == 2 * 4 + 2 * 2 + 1                            # on 13 layers (q/k/v share qkv, linear1)
    sd0 = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    m2.patch_model()
    try:
        patched = {k: v.clone() for k, v in m2.model.state_dict().items()}
    finally:
        m2.unpatch_model()
    scale = 2 / 4
    up_down = lambda p: (lora[f"{p}.lora_B.weight"] @ lora[f"{p}.lora_A.weight"]) * scale  # noqa: E731
    qkv = "diffusion_model.double_blocks.1.img_attn.qkv.weight"
    want = torch.cat([up_down(f"transformer.transformer_blocks.1.attn.to_{c}") for c in "qkv"])
    assert torch.allclose(patched[qkv] - sd0[qkv], want, atol=1e-5)
    lin1 = "diffusion_model.single_blocks.0.linear1.weight"
    delta = patched[lin1] - sd0[lin1]
    assert torch.allclose(delta[: 3 * ff.WIDTH], torch.cat([up_down(f"transformer.single_transformer_blocks.0.attn.to_{c}")
                                                            for c in "qkv"]), atol=1e-5)
    assert float(delta[3 * ff.WIDTH:].abs().max()) == 0.0                   # the MLP part of linear1 untouched
    fin = "diffusion_model.final_layer.linear.weight"
    assert torch.allclose(patched[fin] - sd0[fin], up_down("transformer.proj_out"), atol=1e-5)
    # ... and the patched model is the trainer's hooked student
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx, pooled = teacher.encode_text(["a"])
    cond = teacher.make_cond(ctx, pooled, 32, 32)
    network.attach()
    try:
        hooked = teacher.x0(x, torch.tensor([600]), cond)
    finally:
        network.detach_hooks()
    m2.patch_model()
    try:
        patched_out = Teacher(m2, flux[1], flux[2]).x0(x, torch.tensor([600]), cond)
    finally:
        m2.unpatch_model()
    assert torch.allclose(hooked, patched_out, atol=1e-4)
    # the pack's TDD LoRA Loader: a trained-scale PEFT file, not the alpha-less release
    loader = sys.modules[harness.pack_module().__name__ + ".nodes.lora_loader"]
    _, _, info = loader.load_tdd_lora(patcher, None, str(path), 1.0, 1.0)
    assert "PEFT/diffusers keys with stored alpha" in info and "without alpha" not in info and "base_arch=flux" in info


def test_diffusers_flux_transformer_has_every_module_of_the_file(flux, tmp_path):
    """diffusers-style loaders: every ``transformer.<module>`` of a written file names a Linear of
    diffusers' own FLUX transformer (same reduced config), with lora_A [rank, in] and lora_B [out, rank]."""
    from diffusers import FluxTransformer2DModel

    path = tmp_path / "l.safetensors"
    _trained_like_lora(from_components(*flux), path)
    lora = tensors(path)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4 * 16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=ff.WIDTH // ff.HEADS, num_attention_heads=ff.HEADS,
                                   joint_attention_dim=ff.TEXT_DIM, pooled_projection_dim=ff.TEXT_DIM,
                                   guidance_embeds=True, axes_dims_rope=tuple(ff.AXES))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = {k[len("transformer."):].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in lora}
    assert len(modules) == 21 and modules <= set(linears)
    for name in modules:
        linear = linears[name]
        assert lora[f"transformer.{name}.lora_A.weight"].shape == (4, linear.in_features)
        assert lora[f"transformer.{name}.lora_B.weight"].shape == (linear.out_features, 4)
        assert float(lora[f"transformer.{name}.alpha"]) == 2.0


def test_sampling_with_the_lora_differs(flux, tmp_path):
    from trainer.validation import sample_images

    teacher = from_components(*flux)
    network = _trained_like_lora(teacher, tmp_path / "l.safetensors").attach()
    try:
        ctx, pooled = teacher.encode_text(["a red square"])
        cond = teacher.make_cond(ctx, pooled, 32, 32)
        on = sample_images(teacher, cond, (1, 16, 4, 4), 4, seed=0)
        again = sample_images(teacher, cond, (1, 16, 4, 4), 4, seed=0)
        with network.disabled():
            off = sample_images(teacher, cond, (1, 16, 4, 4), 4, seed=0)
    finally:
        network.detach_hooks()
    assert on.shape == (1, 32, 32, 3) and torch.equal(on, again)
    assert float((on - off).abs().max()) > 1e-3


def test_flux_guidance_setting_reaches_the_transformer(flux):
    teacher = from_components(*flux)
    ctx, pooled = teacher.encode_text(["a red square"])
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for g in (1.5, 3.0):
        teacher.schedule(TrainConfig(flux_guidance=g))                 # what a run does with --flux-guidance
        cond = teacher.make_cond(ctx, pooled, 32, 32)
        assert cond.guidance.tolist() == [g]
        outs.append(teacher.x0(x, torch.tensor([500]), cond))
    assert float((outs[0] - outs[1]).abs().max()) > 1e-4                # the guidance embedding sees it


def test_latents_use_the_vaes_scale_and_shift(flux):
    teacher = from_components(*flux)
    px = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    raw = teacher.vae.encode(px.movedim(1, -1))
    assert torch.allclose(teacher.encode_images(px), (raw - ff.FLUX_VAE_SHIFT) * ff.FLUX_VAE_SCALE, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the file forms, through the host's loaders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    return ff.save_flux_files(tmp_path_factory.mktemp("fluxfiles"), seed=0, unet_dtype=torch.bfloat16)


def _reduced_prompt_length(teacher) -> None:
    """Pad prompts to the reduced FLUX's T5 length (as :func:`flux_fixtures.build_clip` does), to compare
    a loaded teacher's text states with the in-memory reference's."""
    teacher.clip.set_tokenizer_option("t5xxl_min_length", ff.TEXT_TOKENS)
    teacher.text_tokens = ff.TEXT_TOKENS


def test_file_forms_load_as_the_same_model(flux, flux_files):
    ref = from_components(*flux)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    ctx, pooled = ref.encode_text(["a red square"])
    want = ref.x0(x, torch.tensor([500]), ref.make_cond(ctx, pooled, 32, 32))
    with ff.reduced_flux_host():
        allin = load_teacher(str(flux_files["checkpoint"]), dtype=torch.float32, device="cpu")
        parts = load_teacher(None, dtype=torch.float32, device="cpu", unet=str(flux_files["unet"]),
                             clip=[str(flux_files["clip_l"]), str(flux_files["t5xxl"])], vae=str(flux_files["vae"]))
    for t, tol in ((allin, 1e-4), (parts, 5e-2)):                      # the bf16 diffusion-model file rounds
        assert t.arch == "flux" and t.row.lora == "flux-peft" and t.embedded_guidance
        assert t.text_tokens == 256                                    # the host pads FLUX prompts to 256 T5 tokens
        _reduced_prompt_length(t)
        c, p = t.encode_text(["a red square"])                         # the host loads text encoders in fp16
        assert torch.allclose(c, ctx, atol=1e-2, rtol=1e-2) and torch.allclose(p, pooled, atol=1e-2, rtol=1e-2)
        assert torch.allclose(t.x0(x, torch.tensor([500]), t.make_cond(ctx, pooled, 32, 32)), want, atol=tol, rtol=tol)


def test_fp8_files_load_as_the_host_loads_them(flux, flux_files, tmp_path):
    """fp8 (e4m3fn) FLUX files, diffusion model alone and all-in-one: the trainer's base dtype does not
    upcast them; the host picks their weight dtype as UNETLoader / CheckpointLoaderSimple do (on this
    CPU it upcasts; on a GPU with fp8 compute it keeps fp8), with the file's values."""
    import comfy.sd
    from safetensors.torch import load_file, save_file

    from trainer.models import base_model_options

    sd = {k: v.to(torch.float8_e4m3fn) for k, v in flux[0].model.diffusion_model.state_dict().items()}
    unet = tmp_path / "unet_fp8.safetensors"
    save_file(sd, str(unet))
    allin = load_file(str(flux_files["checkpoint"]))
    allin.update({f"model.diffusion_model.{k}": v for k, v in sd.items()})
    checkpoint = tmp_path / "flux_fp8_allin.safetensors"
    save_file(allin, str(checkpoint))
    for path in (unet, checkpoint):
        assert base_model_options(path, torch.bfloat16) == {} and base_model_options(path, None) == {}
        assert base_model_options(path, torch.float8_e4m3fn) == {"dtype": torch.float8_e4m3fn}  # asked for
    assert base_model_options(flux_files["unet"], torch.float32) == {"dtype": torch.float32}   # a bf16 file
    with ff.reduced_flux_host():
        parts = load_teacher(None, dtype=torch.bfloat16, device="cpu", unet=str(unet),
                             clip=[str(flux_files["clip_l"]), str(flux_files["t5xxl"])], vae=str(flux_files["vae"]))
        whole = load_teacher(str(checkpoint), dtype=torch.bfloat16, device="cpu")
        stock_unet = comfy.sd.load_diffusion_model(str(unet))                      # UNETLoader, weight_dtype default
        stock_ckpt = comfy.sd.load_checkpoint_guess_config(str(checkpoint))[0]     # CheckpointLoaderSimple
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    for t, stock in ((parts, stock_unet), (whole, stock_ckpt)):
        assert t.arch == "flux" and t.model.get_dtype() == stock.model.get_dtype()
        loaded = t.unet.state_dict()
        assert all(torch.equal(loaded[k].float(), v.float()) for k, v in sd.items())   # the fp8 file's values
        _reduced_prompt_length(t)
        c, p = t.encode_text(["a red square"])
        cond = t.make_cond(c, p, 32, 32)
        want = stock.model.apply_model(x, torch.tensor([0.501]), c_crossattn=c, y=p, guidance=cond.guidance)
        assert torch.allclose(t.x0(x, torch.tensor([500]), cond), want, atol=1e-5)


def test_cli_trains_from_separate_files(flux_files, images, tmp_path):
    with ff.reduced_flux_host():
        rc = main(["--unet", str(flux_files["unet"]), "--clip", str(flux_files["clip_l"]), "--clip",
                   str(flux_files["t5xxl"]), "--vae", str(flux_files["vae"]), "--data", str(images),
                   "--out", str(tmp_path / "l.safetensors"), "--resolution", "32", "--rank", "4", "--max-steps", "1",
                   "--device", "cpu", "--no-progress", "--num-workers", "0", "--no-calibrate"])
    assert rc == 0 and read_tdd_metadata(tmp_path / "l.safetensors")["tdd_base_arch"] == "flux"


def test_flux_preset_sets_the_reference_hyper_parameters():
    files = ["--unet", "u.safetensors", "--clip", "l.safetensors", "--clip", "t5.safetensors", "--vae", "ae.safetensors"]
    c = parse_args([*files, "--data", "d", "--preset", "flux"])
    assert (c.lr, c.weight_decay, c.loss, c.grad_clip, c.rank, c.alpha, c.resolution, c.flux_guidance,
            c.empty_prompt_prob, c.lr_schedule) == (1e-4, 1e-2, "l2", 1.0, 64, 8, 1024, 1.5, 0.0, "constant")
    assert {k: getattr(c, k) for k in FLUX_DEFAULTS} == FLUX_DEFAULTS     # the family defaults of §5.1
    assert (c.batch_size, c.accumulate_to, c.max_steps, c.base_dtype, c.gradient_checkpointing) == \
        (4, 128, 100000, "bf16", True)
    c.world_size = 8                                                     # 8 GPUs x 4 x accumulation 4 = 128
    assert c.resolve_accumulation().grad_accum == 4 and c.global_batch == 128
    assert parse_args([*files, "--data", "d", "--preset", "flux", "--lr", "3e-5"]).lr == 3e-5   # flags win


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _cli_error(args, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trainer"):
        rc = main(args)
    return rc, " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_flux_file_without_text_encoders_or_vae(flux_files, images, tmp_path, caplog):
    rc, msg = _cli_error(["--teacher", str(flux_files["unet"]), "--data", str(images), "--device", "cpu"], caplog)
    assert rc == 2 and "FLUX diffusion model without its text encoders and VAE" in msg
    assert f"--unet {flux_files['unet']}" in msg and "--clip clip_l.safetensors" in msg and "--vae" in msg
    rc, msg = _cli_error(["--unet", str(flux_files["unet"]), "--data", str(images)], caplog)
    assert rc == 2 and "needs its two text encoders and its VAE" in msg and "--clip clip_l.safetensors" in msg
    with pytest.raises(TeacherError, match="FLUX diffusion model without its VAE"):
        from_components(ff.build_unet(0), ff.build_clip(0), None)


def test_text_encoder_of_the_wrong_family(flux_files, images, tmp_path, caplog):
    args = ["--unet", str(flux_files["unet"]), "--clip", str(flux_files["clip_l"]), "--clip", str(flux_files["clip_l"]),
            "--vae", str(flux_files["vae"]), "--data", str(images), "--device", "cpu"]
    with ff.reduced_flux_host():
        rc, msg = _cli_error(args, caplog)
    assert rc == 2 and "needs exactly two text encoders, CLIP-L and T5-XXL" in msg and "clip_l.safetensors (CLIP_L)" in msg
    with pytest.raises(TeacherError, match="not FLUX's CLIP-L \\+ T5-XXL pair"):
        from_components(ff.build_unet(0), fx.tiny_module().build_tiny_clip(0), ff.build_vae(0))


def test_vae_of_the_wrong_family(flux_files, tmp_path):
    from safetensors.torch import save_file

    sd_vae = tmp_path / "sd_vae.safetensors"
    save_file(ff.vae_state_dict(0, latent_channels=4), str(sd_vae))
    with ff.reduced_flux_host(), pytest.raises(TeacherError, match="has 4 latent channels, not FLUX's 16.*ae.safetensors"):
        load_teacher(None, device="cpu", unet=str(flux_files["unet"]),
                     clip=[str(flux_files["clip_l"]), str(flux_files["t5xxl"])], vae=str(sd_vae))


def test_unsupported_method_on_flow(flux, images, tmp_path):
    with pytest.raises(ConfigError, match="--method lcm is not supported for flow-matching \\(FLUX\\).*tdd.*tcd"):
        train(cfg(images, tmp_path, method="lcm", max_steps=1), components=flux)


def test_sdxl_lora_resumed_on_a_flux_run(flux, images, tmp_path):
    sd_run = train(cfg(images, tmp_path / "sd", max_steps=1, batch_size=1, resolution=64), components=fx.tiny_sdxl(0))
    with pytest.raises(ResumeError, match=r"different base model \(teacher\).*teacher: checkpoint 'sdxl-.*now 'flux-"):
        train(cfg(images, tmp_path / "flux", max_steps=2, resume=sd_run["run_dir"]), components=flux)
