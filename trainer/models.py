"""The model seam: the only module of the trainer that imports ComfyUI (``comfy.*``).

A :class:`Teacher` wraps the host's (MODEL, CLIP, VAE) triple, however it was made:

- :func:`load_checkpoint` - a single-file checkpoint through the host's own loader
  (``comfy.sd.load_checkpoint_guess_config``), so whatever SD1.5 / SD2.x / SDXL file ComfyUI loads
  can be distilled;
- :func:`from_components` - an already-built ``(ModelPatcher, CLIP, VAE)`` (the pack's tiny model,
  test models built from host classes with random weights);
- :func:`load_flux_files` - FLUX.1 kept as separate files (diffusion model, CLIP-L + T5-XXL, VAE)
  through the host's UNETLoader / DualCLIPLoader / VAELoader functions;
- :func:`load_teacher` - dispatch on a ``--teacher`` string: a file path, or a factory
  ``module:function`` / ``path/to/file.py:function`` returning such a triple.

The trainer talks to the networks only through :meth:`Teacher.x0` (an x0 prediction at an integer
timestep of the family's schedule; the host handles eps-, v- and flow-prediction), the encoders,
:meth:`Teacher.schedule` (the family's noise levels and teacher step) and :meth:`Teacher.lora_targets`
(host module -> LoRA key via ComfyUI's diffusers<->ldm key maps). :class:`FluxTeacher` is the FLUX.1
family (docs/method.md §5.1); ``Teacher(...)`` returns one for a FLUX model.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

from .algorithm import Cond, DiscreteSchedule
from .flow import FLUX_GUIDANCE, FLUX_LORA_MODULE_RE, FlowSchedule, flow_sigmas
from .lora import OutputSlice
from .fileio import load_module

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SUPPORTED_CONFIGS = {"SD15": "sd15", "SD20": "sd2x", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                     "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
NATIVE_RESOLUTION = {"sd15": 512, "sd2x": 512, "sdxl": 1024}

#: The LoRA module set of docs/method.md §5 (step 9), as diffusers module paths.
LORA_TARGET_RE = re.compile(
    r"(\.attn[12]\.to_(q|k|v|out\.0)|\.attentions\.\d+\.proj_(in|out)|\.ff\.net\.(0\.proj|2)"
    r"|\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|\.(down|up)samplers\.0\.conv)\.weight$")


class TeacherError(RuntimeError):
    """The teacher can't be used; the message names the problem and the fix."""


def comfyui_path() -> Path:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p).resolve() if p else REPO / ".host" / "ComfyUI"


def ensure_host(device: str | None = None) -> None:
    """Make ``comfy`` importable (``$COMFYUI_PATH`` or ``<repo>/.host/ComfyUI``); CPU mode without CUDA.

    Inside a running ComfyUI this is a no-op (``comfy`` is already imported).
    """
    if "comfy" not in sys.modules:
        root = comfyui_path()
        if not (root / "comfy").is_dir():
            raise TeacherError(f"ComfyUI not found at {root}: set COMFYUI_PATH to a ComfyUI checkout "
                               "(or run scripts/bootstrap.sh to build <repo>/.host/ComfyUI)")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        if device == "cpu" or not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        elif device and device.startswith("cuda") and ":" in device:
            torch.cuda.set_device(torch.device(device))


def _arch_of(model) -> str:
    """'sd15' | 'sd2x' | 'sdxl' for a ``comfy.model_base.BaseModel``, or a TeacherError."""
    import comfy.model_base as mb
    import comfy.model_sampling

    cfg_name = type(model.model_config).__name__
    mt = getattr(model, "model_type", None)
    # (a model patched to flow sampling, e.g. by ModelSamplingSD3 in a graph, keeps its model_type:
    # its model_sampling's CONST parameterisation tells)
    flow_sampling = isinstance(model.model_sampling, comfy.model_sampling.CONST)
    if mt in (mb.ModelType.FLOW, mb.ModelType.FLUX, mb.ModelType.FLOW_COSMOS) or flow_sampling \
            or "Flow" in type(model.model_sampling).__name__:
        if _is_flux_dev(model):
            return "flux"
        raise TeacherError(f"the teacher is a flow-matching model ({cfg_name}) other than FLUX.1-dev: flow "
                           "distillation supports FLUX.1-dev and its fine-tunes (guidance-embedded FLUX) only, "
                           "not SD3.x, FLUX.1-schnell or other flow models; use a FLUX.1-dev-based model, or an "
                           "SD1.5, SD2.x or SDXL checkpoint")
    arch = SUPPORTED_CONFIGS.get(cfg_name)
    if arch is None:
        raise TeacherError(f"unsupported teacher architecture {cfg_name}: the trainer distils SD1.5, SD2.x "
                           "(eps or v-prediction) and SDXL checkpoints; pick one of those as --teacher")
    if mt not in (mb.ModelType.EPS, mb.ModelType.V_PREDICTION):
        raise TeacherError(f"unsupported prediction type {getattr(mt, 'name', mt)} for {cfg_name}: the trainer "
                           "needs an eps- or v-prediction model on the 1000-step DDPM schedule")
    if model.model_config.unet_config.get("in_channels", 4) != model.model_config.unet_config.get("out_channels", 4):
        raise TeacherError(f"unsupported teacher {cfg_name} with concat conditioning (inpainting/instruct "
                           "models): use a plain text-to-image checkpoint")
    return arch


def _is_flux_dev(model) -> bool:
    """A FLUX.1 transformer with the guidance embedding (dev and its fine-tunes), text-to-image."""
    import comfy.model_base as mb

    unet_config = model.model_config.unet_config
    return (type(model) is mb.Flux and unet_config.get("image_model") == "flux" and bool(unet_config.get("guidance_embed"))
            and unet_config.get("in_channels") == unet_config.get("out_channels"))


def model_fingerprint(module: torch.nn.Module, samples: int = 32) -> str:
    """Cheap identity of a set of weights: names, shapes, and a slice of the values of a few tensors."""
    h = hashlib.sha256()
    items = sorted(module.state_dict().items())
    for k, v in items:
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    step = max(1, len(items) // samples)
    for k, v in items[::step]:
        if v.device.type != "meta" and v.numel():
            h.update(v.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_targets(model) -> dict[str, torch.nn.Module]:
    """kohya prefix -> UNet layer of a ``comfy.model_base.BaseModel``, for the module set of docs/method.md §5
    (section 5.9), through ComfyUI's own diffusers<->ldm key map (``comfy.utils.unet_to_diffusers``).
    Works on a meta-device model (only names and layer types are read)."""
    import comfy.utils

    unet, out = model.diffusion_model, {}
    for dkey, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        if not LORA_TARGET_RE.search("." + dkey):
            continue
        try:
            module = unet.get_submodule(ldm_key[: -len(".weight")])
        except AttributeError:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out["lora_unet_" + dkey[: -len(".weight")].replace(".", "_")] = module
    return out


class Teacher:
    """The host's MODEL/CLIP/VAE triple as the trainer sees it (discrete-schedule SD1.5/SD2.x/SDXL;
    a FLUX model gives a :class:`FluxTeacher`)."""

    def __new__(cls, patcher, *args, **kwargs):
        if cls is Teacher and _arch_of(patcher.model) == "flux":
            cls = FluxTeacher
        return super().__new__(cls)

    def __init__(self, patcher, clip, vae, name: str = "components"):
        self.patcher, self.clip, self.vae, self.name = patcher, clip, vae, name
        self.model = patcher.model                       # comfy.model_base.BaseModel
        self.arch = _arch_of(self.model)
        if clip is None:
            raise TeacherError(f"{name} has no text encoder: use a full checkpoint (UNet + CLIP + VAE)")
        if vae is None:
            raise TeacherError(f"{name} has no VAE: use a full checkpoint (UNet + CLIP + VAE)")
        import comfy.model_base as mb
        self.prediction = "v" if self.model.model_type == mb.ModelType.V_PREDICTION else "eps"
        self.unet = self.model.diffusion_model
        self.sigmas = self.model.model_sampling.sigmas.detach().float().cpu()
        if self.sigmas.numel() != 1000:
            raise TeacherError(f"{name}: the trainer needs the 1000-step DDPM schedule, got {self.sigmas.numel()} steps")
        self.uses_adm = self.model.model_config.unet_config.get("adm_in_channels") is not None
        self.uncond_zeros = self.arch == "sdxl"          # docs/method.md §5, step 6
        self.native_resolution = NATIVE_RESOLUTION[self.arch]
        if self.arch == "sd2x" and self.prediction == "v":
            self.native_resolution = 768
        self._freeze()

    def _freeze(self) -> None:
        self.device = torch.device("cpu")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._fingerprint = None

    # ---- the family's algebra ----------------------------------------------------------------
    def schedule(self, cfg=None) -> DiscreteSchedule:
        """Noise levels, moves and teacher step for :func:`trainer.algorithm.compute_loss`."""
        return DiscreteSchedule(self.sigmas)

    def space(self):
        """tdd_core's sampling space of this model (validation grids)."""
        from tdd_core import VarianceExploding
        return VarianceExploding(self.sigmas.to(self.device))

    def start_latent(self, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The sampler's first latent from unit noise at the top level ``sigma`` (ComfyUI's full-denoise scaling)."""
        return noise * (1.0 + sigma ** 2) ** 0.5

    def lora_file_keys(self, sd: dict) -> dict:
        """The trainer's LoRA tensors under the keys of this family's output file (kohya: as they are)."""
        return sd

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{self.arch}-{model_fingerprint(self.unet)}"
        return self._fingerprint

    # ---- placement ---------------------------------------------------------------------------
    def to(self, device) -> "Teacher":
        """Move the UNet to ``device`` (outside ComfyUI's model management, so it is never offloaded
        behind the trainer's back; CLIP and VAE are loaded/offloaded by the host as usual)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ---- LoRA targets ------------------------------------------------------------------------
    def lora_targets(self) -> dict[str, torch.nn.Module]:
        return lora_targets(self.model)

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        """The layers inside each UNet block (ResBlocks, transformers, samplers): the host's UNet runs a
        block's layers one by one (``forward_timestep_embed``), never the block's own ``forward``."""
        u = self.unet
        return [layer for block in (*u.input_blocks, u.middle_block, *u.output_blocks) for layer in block]

    # ---- networks ----------------------------------------------------------------------------
    def x0(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 prediction for VP latents ``z`` at integer timesteps ``t`` (the host converts from its
        variance-exploding input ``z / a_t`` and from eps/v outputs)."""
        sigma = self.sigmas[t.long().cpu()].to(z.device)
        x = z * (1.0 + sigma.view(-1, *[1] * (z.ndim - 1)) ** 2).sqrt()
        kwargs = {} if cond.y is None else {"y": cond.y}
        return self.model.apply_model(x, sigma, c_crossattn=cond.context, **kwargs)

    def denoiser(self, cond: Cond):
        """``model(x, sigma) -> x0`` in the host's VE space, for :func:`tdd_core.sample_tdd`."""
        def model(x, sigma, **_):
            kwargs = {} if cond.y is None else {"y": cond.y}
            return self.model.apply_model(x, sigma, c_crossattn=cond.context, **kwargs)
        return model

    def guided_denoiser(self, cond: Cond, empty: Cond, scale: float):
        """:meth:`denoiser` with TDD Guidance: CFG at ``scale`` against the encoded empty prompt ``empty``
        (one batched forward for both; ``scale`` 1 is one conditional pass)."""
        if scale == 1.0:
            return self.denoiser(cond)
        from tdd_core import cfg as guided
        n = cond.context.shape[0]
        both = cond.cat(Cond(empty.context.expand(n, *empty.context.shape[1:]),
                             None if empty.y is None else empty.y.expand(n, *empty.y.shape[1:])))
        kwargs = {} if both.y is None else {"y": both.y}

        def model(x, sigma, **_):
            c, u = self.model.apply_model(torch.cat([x, x]), torch.cat([sigma, sigma]), c_crossattn=both.context,
                                          **kwargs).chunk(2)
            return guided(c, u, scale)
        return model

    def default_reference_guidance(self) -> float:
        """The teacher's guidance for a reference image: CFG 4.5, the trainer's teacher guidance 3.5 in
        the CFG convention (1 + w)."""
        return 4.5

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, h, w) of the x0 latent of a ``resolution`` x ``resolution`` image."""
        f = self.latent_factor
        return int(self.model.latent_format.latent_channels), resolution // f, resolution // f

    @contextlib.contextmanager
    def lora_file_applied(self, path, strength: float = 1.0):
        """Inside this block the model carries the LoRA file ``path`` (any format ComfyUI's LoraLoader
        reads), patched into its weights by the host; they are restored on exit."""
        import comfy.sd
        import comfy.utils

        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(self.patcher, None, lora, strength, 0.0)
        patched.patch_model(device_to=self.device)
        try:
            yield
        finally:
            patched.unpatch_model(device_to=self.device)

    # ---- encoders ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per caption (first 77-token chunk): context [B, 77, D] and pooled [B, P] (or None)."""
        ctxs, pools = [], []
        for caption in captions:
            tokens = self.clip.tokenize(caption)
            tokens = {k: v[:1] for k, v in tokens.items()}
            ctx, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            ctxs.append(ctx.float().cpu())
            pools.append(None if pooled is None else pooled.float().cpu())
        pooled = None if any(p is None for p in pools) else torch.cat(pools)
        return torch.cat(ctxs), pooled

    def make_cond(self, context: torch.Tensor, pooled: torch.Tensor | None, height: int, width: int,
                  geometry=None) -> Cond:
        """Conditioning for images of ``height x width`` pixels (SDXL: the ADM vector from pooled + sizes).
        ``geometry``: per sample ``(original_h, original_w, crop_top, crop_left)`` for SDXL's size conditioning
        (default: the image is the whole ``height x width``, uncropped)."""
        y = None
        if self.uses_adm:
            if pooled is None:
                raise TeacherError(f"{self.name}: the text encoder gave no pooled output, which this model needs")
            geometry = geometry or [(height, width, 0, 0)] * pooled.shape[0]
            y = torch.cat([self.model.encode_adm(pooled_output=pooled[i:i + 1].to(self.device), height=oh, width=ow,
                                                 crop_h=top, crop_w=left, target_height=height, target_width=width)
                           for i, (oh, ow, top, left) in enumerate(geometry)])
        return Cond(context.to(self.device), None if y is None else y.to(self.device))

    def uncond(self, empty_context, empty_pooled, height: int, width: int, geometry=None) -> Cond:
        """The teacher's unconditional branch (docs/method.md §5, step 6): encoded empty prompt, or zeros for SDXL
        (text only: the size conditioning stays the sample's)."""
        if self.uncond_zeros:
            empty_context = torch.zeros_like(empty_context)
            empty_pooled = None if empty_pooled is None else torch.zeros_like(empty_pooled)
        return self.make_cond(empty_context, empty_pooled, height, width, geometry)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` [B, 3, H, W] in [0, 1] -> x0 latents (VAE latent times the scaling factor)."""
        latent = self.vae.encode(pixels.movedim(1, -1).float())
        return self.model.process_latent_in(latent.float()).float().cpu()

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD/SDXL/FLUX VAEs)."""
        return int(self.vae.spacial_compression_encode())

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` [B, 3, H, W] in [0, 1] -> the VAE posterior (mean, log-variance), each [B, C, h, w], in the
        VAE's own latent space (see :meth:`latent_in`). The host's encode returns the posterior's mode; here its
        Gaussian regulariser is bypassed for one call to get both moments. A VAE without one (deterministic
        encoder) gives log-variance -inf: every draw is the mean."""
        import comfy.ldm.models.autoencoder as autoencoder

        fsm = self.vae.first_stage_model
        reg = getattr(fsm, "regularization", None)
        if not isinstance(reg, autoencoder.DiagonalGaussianRegularizer):
            mean = self.vae.encode(pixels.movedim(1, -1).float()).float().cpu()
            return mean, torch.full_like(mean, float("-inf"))
        fsm.regularization = _PassThrough()
        try:
            moments = self.vae.encode(pixels.movedim(1, -1).float()).float().cpu()
        finally:
            fsm.regularization = reg
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(-30.0, 20.0).contiguous()  # the host's DiagonalGaussian clamp

    def latent_in(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE-space latent -> the model's x0 space (the scaling factor, FLUX also its shift)."""
        return self.model.process_latent_in(z.float()).float().cpu()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents -> images [B, H, W, 3] in [0, 1]."""
        return self.vae.decode(self.model.process_latent_out(x0.float().cpu())).float().clamp(0, 1).cpu()


class _PassThrough(torch.nn.Module):
    """A regulariser that returns the encoder's moments as they are (the host's EmptyRegularizer,
    which ComfyUI 0.3.52 does not have)."""

    def forward(self, z):
        return z, None


FLUX_FILES_HINT = ("pass the diffusion model as --unet with its text encoders and VAE: --unet flux1-dev.safetensors "
                   "--clip clip_l.safetensors --clip t5xxl_fp16.safetensors --vae ae.safetensors "
                   "(or an all-in-one FLUX checkpoint as --teacher)")
T5_TOKENS = 256  # T5 states per caption (ComfyUI pads FLUX prompts to 256 tokens; longer ones are cut)
_PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


def flux_lora_targets(model) -> tuple[dict[str, torch.nn.Module | OutputSlice], dict[str, str]]:
    """The released FLUX TDD LoRA's module set (docs/method.md §5.1) on a host FLUX model, through
    ComfyUI's diffusers<->ldm key map (``comfy.utils.flux_to_diffusers``): q, k and v become slices of
    the fused ``qkv`` / ``linear1`` layers. -> (kohya-style prefix -> target, prefix -> diffusers path).
    Works on a meta-device model."""
    import comfy.utils

    unet, targets, paths = model.diffusion_model, {}, {}
    for dkey, to in comfy.utils.flux_to_diffusers(model.model_config.unet_config).items():
        path = dkey[: -len(".weight")] if dkey.endswith(".weight") else None
        if path is None or not FLUX_LORA_MODULE_RE.match(path):
            continue
        ldm_key, part = (to, None) if isinstance(to, str) else to
        module = unet.get_submodule(ldm_key[: -len(".weight")])
        prefix = "lora_transformer_" + path.replace(".", "_")
        targets[prefix] = module if part is None else OutputSlice(module, part[1], part[2])
        paths[prefix] = path
    return targets, paths


class _OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """``a += b`` computed as ``a + b``: ComfyUI's FLUX blocks add their residuals in place (an inference
    memory saving), which autograd refuses once a norm has saved the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.add_ or func is torch.Tensor.__iadd__:
            return torch.add(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _trainable_blocks(blocks) -> None:
    """Let gradients flow through the host's FLUX blocks: while grad is enabled (the student's pass, and
    its recomputation under gradient checkpointing) their in-place residual adds become ordinary adds."""
    for block in blocks:
        if getattr(block, "_tdd_grad_safe", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            with _OutOfPlaceAdds():
                return _inner(*args, **kwargs)

        block.forward = forward
        block._tdd_grad_safe = True


class FluxTeacher(Teacher):
    """FLUX.1-dev (or a fine-tune) as the trainer sees it: a flow-matching transformer called at
    ``sigma_k = (k + 1) / 1000`` with the guidance embedding, CLIP-L (pooled) + T5-XXL text, the
    16-channel VAE with its real scale and shift (the host's latent format), PEFT-named LoRA output."""

    def __init__(self, patcher, clip, vae, name: str = "components"):
        self.patcher, self.clip, self.vae, self.name = patcher, clip, vae, name
        self.model = patcher.model
        self.arch = _arch_of(self.model)
        missing = [what for what, obj in (("text encoders (CLIP-L + T5-XXL)", clip), ("VAE", vae)) if obj is None]
        if missing:
            raise TeacherError(f"{name} is a FLUX diffusion model without its {' and '.join(missing)}: {FLUX_FILES_HINT}")
        import comfy.text_encoders.flux
        if not isinstance(clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel):
            raise TeacherError(f"{name}: the text encoder is {type(clip.cond_stage_model).__name__}, not FLUX's "
                               f"CLIP-L + T5-XXL pair; {FLUX_FILES_HINT}")
        self.prediction = "flow"
        self.unet = self.model.diffusion_model
        self.sigmas = flow_sigmas().float()
        self.uses_adm, self.uncond_zeros = False, False
        self.native_resolution = 1024
        self.guidance = FLUX_GUIDANCE
        # T5 states per caption: the tokenizer's padded length (256 for FLUX; longer captions are cut)
        self.text_tokens = int(getattr(clip, "tokenizer_options", {}).get("t5xxl_min_length", T5_TOKENS))
        self._lora_paths = None
        self._freeze()
        _trainable_blocks(self.checkpoint_blocks())

    def schedule(self, cfg=None) -> FlowSchedule:
        """§5.1's schedule; ``cfg.flux_guidance`` / ``cfg.flux_guidance_range`` set the guidance embedding."""
        if cfg is not None:
            self.guidance = float(cfg.flux_guidance)
        return FlowSchedule(getattr(cfg, "flux_guidance_range", None))

    def space(self):
        from tdd_core import FlowMatching
        return FlowMatching()

    def start_latent(self, noise: torch.Tensor, sigma) -> torch.Tensor:
        return noise * sigma  # ComfyUI's flow noise scaling on an empty latent

    def lora_targets(self) -> dict:
        targets, self._lora_paths = flux_lora_targets(self.model)
        return targets

    def lora_file_keys(self, sd: dict) -> dict:
        """``transformer.<diffusers module>.lora_A.weight / lora_B.weight / alpha`` (PEFT names, alpha stored)."""
        if self._lora_paths is None:
            self.lora_targets()
        out = {}
        for key, value in sd.items():
            prefix, _, suffix = key.partition(".")
            out[f"transformer.{self._lora_paths[prefix]}.{_PEFT_SUFFIX[suffix]}"] = value
        return out

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.double_blocks, *self.unet.single_blocks]

    def _kwargs(self, cond: Cond, n: int) -> dict:
        g = cond.guidance if cond.guidance is not None else torch.full((n,), self.guidance)
        return {"c_crossattn": cond.context, "y": cond.y, "guidance": g.float().to(cond.context.device)}

    def x0(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 for flow latents ``z`` at integer timesteps ``t`` (the host calls FLUX at timestep = sigma
        and returns ``z - sigma v``)."""
        sigma = self.sigmas[t.long().cpu()].to(z.device)
        return self.model.apply_model(z, sigma, **self._kwargs(cond, z.shape[0]))

    def denoiser(self, cond: Cond):
        def model(x, sigma, **_):
            return self.model.apply_model(x, sigma, **self._kwargs(cond, x.shape[0]))
        return model

    def guided_denoiser(self, cond: Cond, empty: Cond, scale: float):
        """FLUX's guidance is its embedding: ``scale`` there, one pass per step (no empty prompt)."""
        return self.denoiser(cond.with_guidance(torch.full((cond.context.shape[0],), float(scale))))

    def default_reference_guidance(self) -> float:
        """FLUX.1-dev's usual guidance embedding (ComfyUI's FluxGuidance default)."""
        return 3.5

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per caption: T5-XXL states [B, 256, D] (the first :attr:`text_tokens`) and the pooled CLIP-L vector [B, P]."""
        ctxs, pools = [], []
        for caption in captions:
            ctx, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
            ctxs.append(ctx[:, :self.text_tokens].float().cpu())
            pools.append(pooled.float().cpu())
        return torch.cat(ctxs), torch.cat(pools)

    def make_cond(self, context: torch.Tensor, pooled: torch.Tensor | None, height: int, width: int,
                  geometry=None) -> Cond:
        n = context.shape[0]
        return Cond(context.to(self.device), pooled.to(self.device), torch.full((n,), self.guidance, device=self.device))

    def uncond(self, empty_context, empty_pooled, height: int, width: int, geometry=None) -> Cond:
        """Unused: the FLUX teacher has no unconditional branch (§5.1)."""
        return self.make_cond(empty_context, empty_pooled, height, width)


def _safetensors_header(path):
    """(name -> meta tensor of the stored shape, set of stored dtype names) from a safetensors header
    (no tensor data is read), or None for another format."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return ({k: torch.empty(sl.get_shape(), device="meta") for k, sl in slices.items()},
                    {sl.get_dtype() for sl in slices.values()})
    except Exception:
        return None


def base_model_options(path, dtype: torch.dtype | None) -> dict:
    """The host loader's ``model_options`` for the trainer's base ``dtype``. A file with fp8 weights gets
    none (unless fp8 is what is asked for): the host picks its weight dtype as UNETLoader and
    CheckpointLoaderSimple do (fp8 kept where fp8 compute or the memory calls for it); others load in ``dtype``."""
    if dtype is None:
        return {}
    header = _safetensors_header(path)
    fp8_file = header is not None and any(d.startswith("F8") for d in header[1])
    return {} if fp8_file and dtype.itemsize > 1 else {"dtype": dtype}


def _is_bare_flux(path) -> bool:
    """A FLUX diffusion-model file without text encoders and VAE (what UNETLoader loads)."""
    header = _safetensors_header(path)
    if header is None:
        return False
    keys = header[0].keys()
    return (any(".double_blocks." in "." + k for k in keys)
            and not any(k.startswith(("text_encoders.", "vae.", "first_stage_model.")) for k in keys))


def _text_encoder_kind(path) -> str:
    """The host's name for the text encoder in ``path`` (``comfy.sd.detect_te_model``), from its header."""
    import comfy.sd

    header = _safetensors_header(path)
    kind = None if header is None else comfy.sd.detect_te_model(header[0])
    return "unrecognised" if kind is None else kind.name


def load_flux_files(unet, clips, vae, dtype: torch.dtype | None = None) -> "FluxTeacher":
    """FLUX.1 as separate files, through the host's own loaders: the diffusion model as UNETLoader
    loads it (``comfy.sd.load_diffusion_model``; an fp8 file keeps its fp8 weights), CLIP-L + T5-XXL as
    DualCLIPLoader(type flux) does (``comfy.sd.load_clip``), the VAE as VAELoader does (``comfy.sd.VAE``)."""
    clips = list(clips or [])
    if not clips or vae is None:
        missing = " and ".join(w for w, ok in (("--clip (CLIP-L and T5-XXL)", clips), ("--vae", vae is not None)) if not ok)
        raise TeacherError(f"--unet {unet} is given without {missing}: {FLUX_FILES_HINT}")
    for flag, p in [("--unet", unet), *[("--clip", c) for c in clips], ("--vae", vae)]:
        if not Path(p).is_file():
            raise TeacherError(f"{flag} {p}: file not found; {FLUX_FILES_HINT}")
    ensure_host()
    kinds = [_text_encoder_kind(c) for c in clips]
    if sorted(k.replace("T5_XXL_OLD", "T5_XXL") for k in kinds) != ["CLIP_L", "T5_XXL"]:
        got = ", ".join(f"{Path(c).name} ({k})" for c, k in zip(clips, kinds))
        raise TeacherError(f"FLUX.1 needs exactly two text encoders, CLIP-L and T5-XXL, but --clip gave {got}: pass "
                           "--clip clip_l.safetensors --clip t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn)")
    import comfy.sd
    import comfy.utils

    try:
        patcher = comfy.sd.load_diffusion_model(str(unet), model_options=base_model_options(unet, dtype))
        clip = comfy.sd.load_clip(ckpt_paths=[str(c) for c in clips], embedding_directory=None,
                                  clip_type=comfy.sd.CLIPType.FLUX)
        vae_sd, vae_meta = comfy.utils.load_torch_file(str(vae), return_metadata=True)
        vae_model = comfy.sd.VAE(sd=vae_sd, metadata=vae_meta)
    except Exception as e:
        raise TeacherError(f"could not load the FLUX files ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           "check that they are complete and belong together, or download them again") from None
    if patcher is None:
        raise TeacherError(f"--unet {unet}: ComfyUI can't recognise it as a diffusion model; {FLUX_FILES_HINT}")
    if vae_model.latent_channels != 16:
        raise TeacherError(f"--vae {vae} has {vae_model.latent_channels} latent channels, not FLUX's 16: pass "
                           "FLUX's ae.safetensors")
    teacher = Teacher(patcher, clip, vae_model, name=Path(unet).name)
    if teacher.arch != "flux":
        raise TeacherError(f"--unet {unet} is a {teacher.arch} model, not FLUX: pass an SD checkpoint as --teacher")
    return teacher


def from_components(model, clip, vae, name: str = "components") -> Teacher:
    """A Teacher from an already-built ``(ModelPatcher, CLIP, VAE)`` (e.g. a tiny random-weight model)."""
    ensure_host()
    return Teacher(model, clip, vae, name=name)


def load_checkpoint(path, dtype: torch.dtype | None = None) -> Teacher:
    """A single-file checkpoint through ComfyUI's own loader; clear errors for missing/corrupt/unsupported."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path}; pass --teacher with the path of an SD1.5, "
                           "SD2.x or SDXL single-file checkpoint (.safetensors or .ckpt)")
    ensure_host()
    import comfy.sd

    if _is_bare_flux(path):  # before loading ~12 GB of weights only to find the encoders missing
        raise TeacherError(f"{path.name} is a FLUX diffusion model without its text encoders and VAE: "
                           + FLUX_FILES_HINT.replace("--unet flux1-dev.safetensors", f"--unet {path}"))
    try:
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=None,
            model_options=base_model_options(path, dtype))
    except RuntimeError as e:
        if "Could not detect model type" in str(e):
            raise TeacherError(f"unsupported teacher {path.name}: ComfyUI can't recognise it as a diffusion model "
                               "checkpoint (is it a LoRA, VAE or text encoder?); pass a full SD1.5, SD2.x or "
                               "SDXL checkpoint") from None
        raise TeacherError(f"could not read teacher checkpoint {path}: {e}; the file looks corrupt or truncated, "
                           "download it again") from None
    except Exception as e:  # safetensors/pickle errors on damaged files
        raise TeacherError(f"could not read teacher checkpoint {path}: {type(e).__name__}: {e}; the file looks "
                           "corrupt or truncated, download it again") from None
    if patcher is None:
        raise TeacherError(f"{path.name} contains no diffusion model; pass a full checkpoint")
    return Teacher(patcher, clip, vae, name=path.name)


def _load_factory(spec: str):
    target, _, func = spec.rpartition(":")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise TeacherError(f"teacher factory file not found: {target}")
        module = load_module(target)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func, None)
    if fn is None:
        raise TeacherError(f"teacher factory {spec!r}: {target} has no function {func!r}")
    return fn


def is_factory_spec(spec: str) -> bool:
    target, sep, func = str(spec).rpartition(":")
    return bool(sep) and func.isidentifier() and not Path(spec).exists() and (
        target.endswith(".py") or all(p.isidentifier() for p in target.split(".")))


def load_teacher(spec, dtype: torch.dtype | None = None, device: str | None = None, unet=None, clip=None,
                 vae=None) -> Teacher:
    """``--teacher``: a checkpoint path, or ``module:function`` / ``file.py:function`` returning
    ``(model, clip, vae)`` built from host classes (called after ComfyUI is importable); or, with
    ``unet`` (``--unet/--clip/--vae``), FLUX as separate files (:func:`load_flux_files`)."""
    ensure_host(device)
    if unet:
        return load_flux_files(unet, clip, vae, dtype)
    if is_factory_spec(spec):
        triple = _load_factory(spec)()
        return Teacher(*triple[:3], name=str(spec))
    return load_checkpoint(spec, dtype)
