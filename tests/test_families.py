"""Every family through the host's own route (issue 26): tiny random-weight models of SD3, FLUX.2,
Qwen-Image, Lumina 2, Z-Image, Chroma, Wan 2.1, HunyuanVideo and AuraFlow built from ComfyUI's own classes
(tests/tdd_test_nodes/families.py), distilled by the one generic Teacher (trainer/families/).

Per family:
- the seam: the loss of a fixed batch falls (in-process);
- TDD Distill over HTTP on the real server writes the LoRA (one run per family, shared by the checks);
- the file's keys are the host's (``comfy.lora.model_lora_keys_unet``), the stock loader
  (``comfy.sd.load_lora_for_models``, what LoraLoader calls) patches 100% of its modules, it changes the
  output and strength 0 changes nothing;
- a 4-step TDD sample (TDD Guidance + TDD Scheduler + TDD Sampler through SamplerCustomAdvanced) with
  the LoRA in the stock LoraLoader, over HTTP; video families sample 5-D latents with frames;
- a run stopped at step 2 and resumed equals an uninterrupted run (the trainer's stop request, which
  ComfyUI's Cancel triggers).
Also: the SD1.5/SD2.x/SDXL/FLUX.1 path gives the LoRAs the old per-family Teachers gave, bit for bit,
and a model the trainer can't serve is refused by name before any work.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import path_reference
import trainer_fixtures as fx

pytestmark = pytest.mark.usefixtures("trainer_host")
FAMS = fx.load_module(fx.REPO / "tests" / "tdd_test_nodes" / "families.py", "tdd_test_families")
NAMES = sorted(FAMS.FAMILIES)
FOLDER = "tdd_family_images"
STEPS = 4


@pytest.fixture(scope="module")
def images(comfy_base) -> Path:
    """4 captioned 32 px images in the server's input folder (and for in-process runs)."""
    folder = fx.make_images(comfy_base / "input" / FOLDER, n=4, size=(40, 32))
    return folder


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = FAMS.build(family, 0)
        return cache[family]
    return get


# ------------------------------------------------------------------------------------------------
# the seam, in process
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", NAMES)
def test_loss_falls_on_a_fixed_batch(family, built):
    from trainer.data import same_length
    from trainer.models import from_components

    teacher = from_components(*built(family), name=family)
    res = FAMS.resolution(family)
    frames = 5 if family in FAMS.VIDEO else None
    px = torch.rand(2, 3, *([frames] if frames else []), res, res, generator=torch.Generator().manual_seed(1))
    x0 = teacher.latent_in(teacher.encode_posterior(px)[0])
    assert x0.ndim == (5 if teacher.latent_dims == 3 else 4)
    ctx, pooled = teacher.encode_text(["a red square", "a blue circle"])
    e_ctx, e_pooled = teacher.encode_text([""])
    ctx, e_ctx = same_length(ctx, e_ctx)                       # as the training loop batches them
    cond = teacher.make_cond(ctx, pooled, res, res)
    uncond = teacher.uncond(e_ctx.expand(2, -1, -1), None if e_pooled is None else e_pooled.expand(2, -1), res, res)
    losses = fx.fixed_batch_losses(teacher, x0, cond, uncond, steps=6, lr=1e-2)
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], (family, losses)


@pytest.mark.parametrize("family", NAMES)
def test_the_trainer_evaluates_the_model_as_the_host_samples_it(family, host, built):
    """4 TDD steps (eta 0) from the same noise, two ways: the host's own graph (CLIPTextEncode [-> FluxGuidance
    for a guidance embedding] -> TDD Guidance at 1 -> TDD Scheduler -> TDD Sampler -> SamplerCustomAdvanced)
    and the trainer's (the prompt through the Teacher's encode_text/make_cond, its noise table, tdd_core's
    sampler). Same noise levels (shift included) and the same latent: the conditioning (extra_conds, text
    masks, pooled vector, guidance) is the host's."""
    from harness import run_node
    from tdd_core import sample_tdd, tdd_timesteps
    from trainer.models import from_components

    model, clip, vae = built(family)
    teacher = from_components(model, clip, vae, name=family)
    res, text, guidance = FAMS.resolution(family), "a red square on a gradient", 2.5
    (pos,) = run_node(host, "CLIPTextEncode", clip=clip, text=text)
    (neg,) = run_node(host, "CLIPTextEncode", clip=clip, text="")
    if teacher.embedded_guidance:
        (pos,) = run_node(host, "FluxGuidance", conditioning=pos, guidance=guidance)
    (guider,) = run_node(host, "TDDGuidance", model=model, positive=pos, negative=neg, scale=1.0,
                         guidance_start=0.0, guidance_end=1.0, rescale=0.0)
    (sigmas,) = run_node(host, "TDDScheduler", model=model, steps=4, non_equidistant=False, denoise=1.0)
    (sampler,) = run_node(host, "TDDSampler", eta=0.0, x0_clip_steps=0)
    (noise,) = run_node(host, "RandomNoise", noise_seed=7)
    shape = (1, *teacher.latent_shape(res))
    out = run_node(host, "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                   latent_image={"samples": torch.zeros(shape)})[0]["samples"]

    ours = torch.cat([teacher.sigmas[tdd_timesteps(4)], torch.zeros(1)])
    torch.testing.assert_close(ours, sigmas.float().cpu(), rtol=1e-5, atol=1e-6)
    ctx, pooled = teacher.encode_text([text])
    ectx, epooled = teacher.encode_text([""])
    cond, empty = teacher.make_cond(ctx, pooled, res, res), teacher.make_cond(ectx, epooled, res, res)
    x = teacher.start_latent(torch.randn(shape, generator=torch.Generator().manual_seed(7)), ours[0])
    with torch.no_grad():
        x0 = sample_tdd(teacher.guided_denoiser(cond, empty, guidance if teacher.embedded_guidance else 1.0), x, ours,
                        eta=0.0, disable=True, space=teacher.space())
    assert out.shape == shape and out.abs().mean() > 0
    torch.testing.assert_close(model.model.process_latent_out(x0), out.float(), rtol=1e-4, atol=1e-5)


def test_the_text_mask_goes_to_the_families_whose_model_takes_it(built):
    """The encoder's attention mask (and the zeroed states it masks) only where the family's extra_conds
    takes one: Qwen-Image, HunyuanVideo, Lumina 2 and Z-Image (whose 0.33 transformer then ignores it); FLUX.2's model
    takes none, so its states stay as the host gives them; CLIP/T5-style encoders give no mask."""
    from trainer.models import from_components

    masked = {f for f in NAMES if from_components(*built(f), name=f).text_masks}
    assert masked == {"hunyuan_video", "lumina2", "qwen_image", "zimage"}


@pytest.mark.parametrize("family", ["hunyuan_video", "qwen_image"])
def test_padded_captions_are_masked(family, built):
    """Captions of different lengths batch padded to the longest, and a short caption's prediction in a batch
    with a long one equals its prediction alone, as the host gives it: Qwen-Image masks the padding;
    HunyuanVideo (whose 0.33 transformer averages every text position and masks one sample only) runs
    such a batch one sample at a time, each at its own length (its row in trainer/families/table.py)."""
    from trainer.data import same_length
    from trainer.models import from_components

    teacher = from_components(*built(family), name=family)
    res = FAMS.resolution(family)
    ctx, pooled = teacher.encode_text(["red", "a long caption about a blue circle moving over a striped field"])
    alone_ctx, alone_pooled = teacher.encode_text(["red"])
    n = alone_ctx.shape[1]
    assert n < ctx.shape[1] and torch.equal(ctx[0, n:], torch.zeros_like(ctx[0, n:]))
    z = torch.randn(2, *teacher.latent_shape(res), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        both = teacher.x0(z, t, teacher.make_cond(ctx, pooled, res, res))
        alone = teacher.x0(z[:1], t[:1], teacher.make_cond(alone_ctx, alone_pooled, res, res))
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-5)
    # a caption with nothing padded batches with the padded empty prompt (CFG's batch, the empty-prompt draws)
    long_ctx, e_ctx = same_length(ctx[1:], teacher.encode_text([""])[0])
    e_pooled = None if pooled is None else teacher.encode_text([""])[1]
    cond, uncond = (teacher.make_cond(long_ctx, None if pooled is None else pooled[1:], res, res),
                    teacher.make_cond(e_ctx, e_pooled, res, res))
    with torch.no_grad():
        batched = teacher.x0(z, t, cond.cat(uncond))
        apart = torch.cat([teacher.x0(z[:1], t[:1], cond), teacher.x0(z[1:], t[1:], uncond)])
        drawn = teacher.x0(z[1:], t[1:], cond.where(torch.tensor([True]), uncond))
    torch.testing.assert_close(batched, apart, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(drawn, apart[1:], rtol=1e-4, atol=1e-5)


def test_generic_path_gives_the_old_path_lora(tmp_path):
    """SD1.5 (the demo model and the tiny one), SD2.x-v, SDXL and FLUX.1 through the generic seam: the
    same 3-step runs give the very LoRAs the old per-family Teachers gave (tests/data/path_reference.json,
    recorded on main before the change), bit for bit."""
    want = json.loads((fx.REPO / "tests" / "data" / "path_reference.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was recorded: float sums are bit-equal only at one thread count
    try:
        for name in want:
            (tmp_path / name).mkdir()
            got = path_reference.run_one(name, tmp_path / name)
            assert sorted(got) == sorted(want[name]), name
            differ = [k for k in want[name] if got[k]["sha256"] != want[name][k]["sha256"]]
            assert differ == [], (name, differ[:3])
    finally:
        torch.set_num_threads(threads)


def test_unsupported_families_are_refused_by_name(built):
    """Refused before any work, naming the model and why: an x0 (LCM-distilled) parameterisation, and
    FLUX.1-schnell (a FLUX model without a guidance embedding: already distilled)."""
    from types import SimpleNamespace

    import comfy.model_sampling
    import comfy.supported_models
    from trainer.families import family_problem
    from trainer.models import Teacher, TeacherError

    patcher = fx.tiny_sd15(0)[0]

    class Distilled(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.X0):
        pass
    lcm = SimpleNamespace(model_config=patcher.model.model_config,
                          model_sampling=Distilled(patcher.model.model_config))
    problem = family_problem(lcm)
    assert problem and "SD15" in problem and "X0 sampling" in problem and "already a few-step model" in problem
    cfg = comfy.supported_models.FluxSchnell(dict(fx.meta_flux().model_config.unet_config, guidance_embed=False))
    cfg.set_inference_dtype(torch.float32, None)
    schnell = cfg.get_model({}, "model.", device=torch.device("meta"))
    with pytest.raises(TeacherError, match="FluxSchnell.*FLUX.1-schnell is already a few-step"):
        Teacher(SimpleNamespace(model=schnell), None, None)


# ------------------------------------------------------------------------------------------------
# over HTTP on the real server: TDD Distill, the file in the stock loader, a TDD sample
# ------------------------------------------------------------------------------------------------
#: The test model's forward call that waits for a cancel: the middle one of step 2 (a training step makes
#: CALLS_PER_STEP forward calls: the student; the teacher, conditional and unconditional in one batch; the
#: target's prediction).
CALLS_PER_STEP = 3
PAUSE_AT_CALL = CALLS_PER_STEP + 2


def distill_graph(family: str, name: str, resume: bool = False, pause_at_call: int = 0) -> dict:
    """TDDTestFamilyModel -> TDD Distill (quick preset, STEPS steps of batch 2) writing ``name``."""
    model = {"family": family, "seed": 0, **({"pause_at_call": pause_at_call} if pause_at_call else {})}
    return {"1": {"class_type": "TDDTestFamilyModel", "inputs": model},
            "2": {"class_type": "TDDDistill", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": FOLDER, "method": "tdd",
                "preset": "quick", "steps": STEPS, "batch": 2, "lr": 1e-3, "rank": 4, "seed": 0,
                "resolution": FAMS.resolution(family), "lora_name": name, "resume": resume, "overwrite": True}}}


@pytest.fixture(scope="module")
def distilled(server, comfy_base, images):
    """family -> (LoRA path, its run's log rows): one TDD Distill run per family, over HTTP."""
    cache = {}

    def get(family):
        if family not in cache:
            name = f"family_{family}"
            server.run(distill_graph(family, name), timeout=600)
            path = comfy_base / "models" / "loras" / f"{name}.safetensors"
            cache[family] = (path, fx.read_log(comfy_base / "models" / "tdd_distill_runs" / name))
        return cache[family]
    return get


@pytest.mark.parametrize("family, sampling, expected", [
    ("wan21_i2v", None, r"WAN21_I2V is not supported: it concatenates an image or mask to its input"),
    ("flux2", "x0", r"unsupported teacher Flux2 \(Flux2\) with X0 sampling: x0 prediction .* already a few-step"),
    ("hunyuan_video", "lcm", r"unsupported teacher HunyuanVideo .* LCM sampling .* already distilled"),
])
def test_an_unsupported_family_is_refused_by_name_over_http_before_any_work(family, sampling, expected, server,
                                                                           comfy_base, images):
    """TDD Distill on a model it can't serve, over HTTP: Wan 2.1 image-to-video (its input needs an image), and
    transformer families switched to an already-distilled parameterisation by the stock ModelSamplingDiscrete
    node. The error names the model and why, nothing is written, and the server goes on serving."""
    from harness import ComfyError, execution_error

    name = f"refused_{family}_{sampling}"
    graph = distill_graph(family, name)
    if sampling:
        graph["3"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": sampling,
                                                                        "zsnr": False}}
        graph["2"]["inputs"]["model"] = ["3", 0]
    with pytest.raises(ComfyError) as exc:
        server.run(graph, timeout=600)
    message = execution_error(exc.value.detail)["exception_message"]
    assert re.search(expected, message), message
    assert not (comfy_base / "models" / "tdd_distill_runs" / name).exists()
    assert not (comfy_base / "models" / "loras" / f"{name}.safetensors").exists()
    assert server.system_stats()["system"]                                   # the server goes on serving


@pytest.mark.parametrize("family", NAMES)
def test_distilled_lora_loads_fully_in_the_stock_loader(family, distilled, built):
    import comfy.lora
    import comfy.sd
    import comfy.utils
    from trainer.lora_format import read_tdd_metadata

    path, rows = distilled(family)
    assert [int(r["step"]) for r in rows][-1] == STEPS and all(np.isfinite(float(r["loss"])) for r in rows)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    patcher = built(family)[0]
    meta = read_tdd_metadata(path)                       # the family named by the host's config class
    assert meta["tdd_base_arch"] == type(patcher.model.model_config).__name__.lower()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    modules = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    assert modules and sorted(m for m in modules if m not in key_map) == []           # the host's own key names
    loaded = comfy.lora.load_lora(lora, key_map)
    assert len(loaded) == len(modules)                                               # 100% of its modules
    assert set(loaded) == {key_map[m] for m in modules}

    res = FAMS.resolution(family)
    x = torch.randn(1, *_latent_shape(patcher, res), generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, FAMS.TEXT_DIM, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, FAMS.TEXT_DIM) if FAMS.FAMILIES[family][2] else None

    def out(strength):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
        patched.patch_model()
        try:
            kw = patched.model.extra_conds(cross_attn=ctx, pooled_output=pooled, noise=x, device=x.device,
                                           width=res, height=res)
            kw = {k: v.process_cond(batch_size=1, area=None, device=x.device).cond for k, v in kw.items()}
            with torch.no_grad():
                return patched.model.apply_model(x, torch.tensor([0.5]), **kw)
        finally:
            patched.unpatch_model()
    base, full, zero = out(None), out(1.0), out(0.0)
    assert not torch.equal(base, full)
    assert torch.equal(base, zero)


def _latent_shape(patcher, res: int) -> tuple:
    fmt = patcher.model.latent_format
    c, f = int(fmt.latent_channels), 8
    return (c, 2, res // f, res // f) if getattr(fmt, "latent_dimensions", 2) == 3 else (c, res // f, res // f)


@pytest.mark.parametrize("family", NAMES)
def test_tdd_sample_with_the_lora_over_http(family, server, distilled):
    """TDDTestFamilyModel -> LoraLoader (stock) -> TDD Guidance / Scheduler / Sampler -> SamplerCustomAdvanced
    at 4 steps; the latent comes from the family's VAE (5 frames -> a 5-D video latent for video families)."""
    path, _ = distilled(family)
    res, frames = FAMS.resolution(family), (5 if family in FAMS.VIDEO else 1)
    graph = {
        "1": {"class_type": "TDDTestFamilyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": path.name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a red square on a gradient"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "6": {"class_type": "TDDGuidance", "inputs": {"model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                      "scale": 1.7, "guidance_start": 0.0, "guidance_end": 1.0,
                                                      "rescale": 0.0}},
        "7": {"class_type": "TDDScheduler", "inputs": {"model": ["2", 0], "steps": 4, "non_equidistant": False,
                                                       "denoise": 1.0}},
        "8": {"class_type": "TDDSampler", "inputs": {"eta": 0.2, "x0_clip_steps": 0}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "10": {"class_type": "EmptyImage", "inputs": {"width": res, "height": res, "batch_size": frames, "color": 0}},
        "15": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["6", 0],
                                                                 "sampler": ["8", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["15", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": f"family_{family}"}},
    }
    entry = server.run(graph, timeout=600)
    paths = server.output_images(entry)
    assert len(paths) == frames                                  # video: a clip of frames back from a 5-D latent
    for p in paths:
        img = np.asarray(Image.open(p), dtype=np.float32)
        assert img.shape[:2] == (res, res) and np.isfinite(img).all()


@pytest.mark.parametrize("family", NAMES)
def test_stop_then_resume_equals_an_uninterrupted_run_and_calibrates(family, built, images, tmp_path):
    """The trainer's stop request at step 2 (what ComfyUI's Cancel triggers in TDD Distill), then resume:
    the same LoRA as 4 uninterrupted steps, and the same calibration (on at the budget rule's floor). The
    calibration sweeps the family's kind of guidance (the embedding's values for FLUX.2/HunyuanVideo, CFG
    scales otherwise)."""
    from trainer import calibrate
    from trainer.lora_format import read_header_metadata
    from trainer.loop import train
    from trainer.models import from_components

    res = FAMS.resolution(family)

    def run(folder, stop_at=None, resume=None):
        cfg = fx.train_config(images, folder, resolution=res, max_steps=STEPS, resume=resume, save_every=1,
                              calibrate=True)

        def on_step(r, row):
            if stop_at is not None and row["step"] == stop_at:
                r.request_stop()
        return train(cfg, components=FAMS.build(family, 0), on_step=on_step)
    whole = run(tmp_path / "whole")
    first = run(tmp_path / "parts", stop_at=2)
    assert first["status"] == "interrupted" and first["step"] == 2 and not (tmp_path / "parts" / "lora.safetensors").exists()
    second = run(tmp_path / "parts", resume=str(tmp_path / "parts" / "run"))
    assert second["status"] == "done"
    a, b = fx.lora_tensors(whole["out"]), fx.lora_tensors(second["out"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    meta, again = read_header_metadata(whole["out"]), read_header_metadata(second["out"])
    table = json.loads(meta["tdd_calibration"])
    assert json.loads(again["tdd_calibration"])["scores"] == table["scores"]
    teacher = from_components(*built(family), name=family)
    kind = calibrate.guidance_family(teacher)
    assert (kind == "flux") == (family in ("flux2", "hunyuan_video"))
    coarse = calibrate.Sweep.for_family(kind, "tdd").coarse(kind)      # the floor's sweep, of this kind
    assert table["plan"]["level"] == "floor" and table["plan"]["guidances"] == list(coarse.guidances)
    assert {s[1] for s in table["scores"]} <= set(coarse.guidances)
    assert float(meta["tdd_recommended_guidance"]) in coarse.guidances
    assert 0 < table["evaluations"] <= table["plan"]["planned_evaluations"]


@pytest.mark.slow
def test_fsdp_shards_a_transformer_family_and_equals_one_process(images, tmp_path):
    """--fsdp on FLUX.2 (a guidance embedding; the host's double and single transformer blocks are the FSDP
    units, with gradient checkpointing as a large family needs it): 2 CPU processes (gloo) with batch 1
    each == 1 unsharded process with batch 2: the same loss curve and LoRA."""
    import subprocess
    import sys

    from test_trainer_run import assert_same_run
    from trainer.loop import train

    res, out = FAMS.resolution("flux2"), tmp_path / "fsdp"
    args = ["--teacher", f"{fx.REPO / 'tests' / 'trainer_fixtures.py'}:tiny_flux2", "--data", str(images),
            "--out", str(out / "lora.safetensors"), "--run-dir", str(out / "run"), "--resolution", str(res),
            "--rank", "4", "--alpha", "2", "--lr", "1e-3", "--max-steps", "3", "--batch-size", "1",
            "--save-every", "3", "--device", "cpu", "--no-progress", "--num-workers", "0", "--no-calibrate",
            "--fsdp", "--gradient-checkpointing"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(fx.REPO / "trainer" / "distill.py"), *args]
    p = subprocess.run(cmd, env=fx.subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "the frozen base is sharded over 2 processes" in p.stderr, p.stderr[-3000:]
    single = train(fx.train_config(images, tmp_path / "one", resolution=res, max_steps=3, batch_size=2,
                                   save_every=3), components=FAMS.build("flux2", 0))
    assert_same_run(out, tmp_path / "one", single["losses"])


@pytest.mark.parametrize("family", NAMES)
def test_tdd_lora_loader_gives_the_family_settings(family, host, distilled, built):
    """TDD LoRA Loader on the family's model with its distilled file: the recommended steps/eta/guidance
    of the family's guidance kind (a guidance embedding samples as FLUX.1 does: 8 steps at 2.0; CFG
    families at TDD's 4 steps and CFG 1.7), and what the guidance value means."""
    from harness import run_node
    from trainer.lora_format import read_tdd_metadata

    path, _ = distilled(family)
    model, clip, _ = built(family)
    info, steps, eta, guidance = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=path.name,
                                          strength_model=1.0, strength_clip=1.0)[2:]
    embedded = family in ("flux2", "hunyuan_video")
    assert read_tdd_metadata(path)["tdd_guidance_kind"] == ("embedding" if embedded else "cfg")
    assert (steps, guidance) == ((8, 2.0) if embedded else (4, 1.7)), info
    assert ("guidance embedding (FluxGuidance)" if embedded else "CFG scale") in info


# ------------------------------------------------------------------------------------------------
# memory: the estimate from parameter counts, and the refusal before the first step
# ------------------------------------------------------------------------------------------------
def test_memory_estimate_from_parameter_counts():
    from trainer.memory import GIB, ModelSize, estimate

    flux_dev = ModelSize(params=11_901_408_320, width=3072, blocks=57, tokens=4096 + 512)   # 1024 px, T5 512
    plain = estimate(flux_dev, base_dtype="bf16")
    ckpt = estimate(flux_dev, base_dtype="bf16", checkpointing=True)
    assert plain.weights == 2 * flux_dev.params and ckpt.weights == plain.weights     # the frozen base, bf16
    assert plain.lora == 64 * 18 * 3072 * 57 * 16                                      # rank 64, fp32 + AdamW
    assert ckpt.activations * 10 < plain.activations                                   # checkpointing saves most
    assert 22 < ckpt.total / GIB < 30 < plain.total / GIB                              # FLUX.1 fits 40 GB only so
    assert estimate(flux_dev, batch=2).activations == 2 * plain.activations
    assert estimate(flux_dev, base_dtype="fp8").weights == flux_dev.params


@pytest.mark.parametrize("family", ["wan21"])
def test_a_run_that_does_not_fit_is_refused_before_the_first_step(family, built, images, tmp_path, monkeypatch):
    import trainer.loop
    from trainer.config import ConfigError
    from trainer.memory import GIB, estimate
    from trainer.models import from_components

    res = FAMS.resolution(family)
    teacher = from_components(*built(family), name=family)
    size = teacher.model_size(res)
    plain = estimate(size, batch=2, base_dtype="fp32", rank=4).total
    ckpt = estimate(size, batch=2, base_dtype="fp32", checkpointing=True, rank=4).total
    assert ckpt < plain
    for available, option in (((plain + ckpt) // 2, "turn on gradient checkpointing"),
                              (ckpt - 1, "store the frozen base in bf16"), (GIB // 2, "lower --resolution")):
        monkeypatch.setattr(trainer.loop, "available_memory", lambda device, a=available: a)
        cfg = fx.train_config(images, tmp_path / str(available), resolution=res, max_steps=2, rank=4)
        with pytest.raises(ConfigError, match=f"{teacher.arch} needs about .* GiB to distil at batch 2.*{option}"):
            trainer.loop.train(cfg, components=FAMS.build(family, 0))
        assert not (tmp_path / str(available) / "run" / "log.csv").exists()        # no step was taken


def test_tdd_distill_names_the_option_when_the_model_does_not_fit(host, images, monkeypatch, built):
    """The node's error, before any step: the estimate, the device's memory and the option to try."""
    import trainer.loop
    from harness import run_node

    from types import SimpleNamespace

    monkeypatch.setattr(trainer.loop, "available_memory", lambda device: 1024 ** 2)
    # (the executor sets a V3 node's hidden inputs; run_node calls the class directly)
    monkeypatch.setattr(host.NODE_CLASS_MAPPINGS["TDDDistill"], "hidden", SimpleNamespace(unique_id=None), raising=False)
    model, clip, vae = FAMS.build("sd3", 0)
    with pytest.raises(Exception, match="sd3 needs about .* GiB to distil at batch 2.*but cpu has 0.0 GiB.*lower "
                                        "--resolution or --batch-size"):
        run_node(host, "TDDDistill", model=model, clip=clip, vae=vae, images=FOLDER, method="tdd", preset="quick",
                 steps=2, batch=2, lr=1e-3, rank=4, seed=0, resolution=32, lora_name="family_too_big", resume=False,
                 overwrite=True)


# ------------------------------------------------------------------------------------------------
# video data: clips (video files, folders of frames) and images as 1-frame clips
# ------------------------------------------------------------------------------------------------
def _clip_frames(n: int, size=(40, 32), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]   # a pattern moving right


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for arr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture()
def clips(tmp_path) -> Path:
    """A 7-frame .mp4, a folder of 5 frames, both captioned, and one captioned image."""
    root = tmp_path / "clips"
    root.mkdir()
    write_video(root / "moving.mp4", _clip_frames(7))
    (root / "moving.txt").write_text("a pattern moving right")
    (root / "frames").mkdir()
    for i, arr in enumerate(_clip_frames(5, seed=1)):
        Image.fromarray(arr).save(root / "frames" / f"{i:03d}.png")
    (root / "frames.txt").write_text("another pattern moving right")
    Image.fromarray(_clip_frames(1, seed=2)[0]).save(root / "still.png")
    (root / "still.txt").write_text("a still image")
    return root


def test_video_data_clips_frame_folders_and_images(clips, tmp_path, built, monkeypatch):
    """Clips (a video file, a folder of frames) and an image as a 1-frame clip; a 5-frame run of Wan trains
    on 5-D latents and calibrates on 5-frame clips."""
    from trainer import calibrate, data
    from trainer.lora_format import read_header_metadata
    from trainer.loop import train
    from trainer.models import from_components

    items, bad = data.scan(clips)
    assert bad == [] and {Path(it.path).name: it.frames for it in items} == {"frames": 5, "moving.mp4": 7,
                                                                               "still.png": 1}
    teacher = from_components(*built("wan21"), name="wan21")
    with pytest.raises(data.DataError, match="fewer than the 5 frames.*still.png.*lower --frames"):
        data.TrainData(items, teacher, 16, num_workers=0, frames=5)
    clip = data.load_clip(str(clips / "moving.mp4"), 16, 5)
    assert clip.shape == (3, 5, 16, 16) and 0 <= float(clip.min()) and float(clip.max()) <= 1
    one = data.TrainData(items, teacher, 16, num_workers=0, frames=1)     # every item as a 1-frame clip
    x0, ctx, _, _ = one.fetch([0, 1, 2], [0, 1, 2])
    assert x0.shape == (3, 16, 1, 2, 2) and ctx.shape[0] == 3
    (clips / "still.png").unlink()
    five = data.TrainData(data.scan(clips)[0], teacher, 16, num_workers=0, frames=5)
    x0, _, _, _ = five.fetch([0, 1], [0, 1])
    assert x0.shape == (2, 16, 2, 2, 2)                                   # 5 frames -> 2 latent frames (causal 4x)
    cfg = fx.train_config(clips, tmp_path / "run5", resolution=16, max_steps=2, frames=5, calibrate=True)
    sampled = []                                                          # calibration's latents, as sampled
    real_run = calibrate.Calibrator.run

    def run(self, *args, **kwargs):
        out = real_run(self, *args, **kwargs)
        sampled.append(tuple(out.latents.shape))
        return out
    monkeypatch.setattr(calibrate.Calibrator, "run", run)
    result = train(cfg, components=FAMS.build("wan21", 0))
    assert result["status"] == "done" and len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    # calibrated on 5-frame clips (5-D latents, as the run trained and the user samples), into the file
    assert sampled and {shape[1:] for shape in sampled} == {(16, 2, 2, 2)}
    meta = read_header_metadata(result["out"])
    table = json.loads(meta["tdd_calibration"])
    assert table["evaluations"] > 0 and table["plan"]["level"] == "floor" and meta["tdd_frames"] == "5"
    # the calibration CLI recalibrates the file at the clip length it was trained on (tdd_frames)
    factory = tmp_path / "wan_factory.py"
    factory.write_text("import trainer_fixtures as fx\n"
                       "FAMS = fx.load_module(fx.REPO / 'tests' / 'tdd_test_nodes' / 'families.py', 'tdd_test_families')\n"
                       "def wan():\n    return FAMS.build('wan21', 0)\n")
    sampled.clear()
    assert calibrate.main(["--teacher", f"{factory}:wan", "--lora", str(result["out"]), "--out",
                           str(tmp_path / "again.safetensors"), "--prompts", "2", "--steps", "4",
                           "--resolution", "16"]) == 0
    assert sampled and {shape[1:] for shape in sampled} == {(16, 2, 2, 2)}


def test_latent_shape_counts_the_video_vae_frames(built):
    from trainer.models import from_components

    wan = from_components(*built("wan21"), name="wan21")
    assert wan.latent_shape(16, 5) == (16, 2, 2, 2) and wan.latent_shape(16, 1) == (16, 1, 2, 2)
    assert wan.latent_shape(16, 9) == (16, 3, 2, 2)                       # the causal VAE: 1 + (T - 1) / 4
    sd3 = from_components(*built("sd3"), name="sd3")
    assert sd3.latent_shape(32) == (16, 4, 4)


@pytest.mark.parametrize("family", NAMES)
def test_cancel_over_http_then_resume_equals_an_uninterrupted_run(family, server, comfy_base, distilled):
    """ComfyUI's Cancel (``POST /interrupt``) during TDD Distill, then the same prompt again (resume on): the
    LoRA of the uninterrupted run (the ``distilled`` one: same settings, another name), bit for bit. The
    test model's forward call :data:`PAUSE_AT_CALL` (inside step 2) waits for the cancel, so the cancel lands
    mid-step on any machine; the test cancels once step 1's log row is written. A cancel mid-step keeps
    the last finished step (1) and drops the one in progress; queued again, the run goes on from step 1."""
    from safetensors.torch import load_file
    from test_distill_node import wait_for_rows

    straight, _ = distilled(family)
    name = f"cancel_{family}"
    runs, loras = comfy_base / "models" / "tdd_distill_runs", comfy_base / "models" / "loras"
    status, body = server.queue(distill_graph(family, name, resume=True, pause_at_call=PAUSE_AT_CALL))
    assert status == 200, body
    wait_for_rows(runs / name / "log.csv", 1)
    server._request("POST", "/interrupt", {})
    entry = server.wait(body["prompt_id"], timeout=300)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    stopped_at = int((runs / name / "latest").read_text().strip().split("-")[1])
    assert stopped_at == 1 and not (loras / f"{name}.safetensors").exists()
    server.run(distill_graph(family, name, resume=True), timeout=600)                  # queued again: resumes
    assert [int(r["step"]) for r in fx.read_log(runs / name)] == list(range(1, STEPS + 1))
    a, b = load_file(str(loras / f"{name}.safetensors")), load_file(str(straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
