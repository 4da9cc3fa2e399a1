"""The model seam: the only module of the trainer that imports ComfyUI (``comfy.*``).

A :class:`Teacher` wraps the host's (MODEL, CLIP, VAE) triple, however it was made:

- :func:`load_checkpoint` - a single-file checkpoint through the host's own loader
  (``comfy.sd.load_checkpoint_guess_config``), so whatever SD1.5 / SD2.x / SDXL file ComfyUI loads
  can be distilled;
- :func:`from_components` - an already-built ``(ModelPatcher, CLIP, VAE)`` (the pack's tiny model,
  test models built from host classes with random weights);
- :func:`load_teacher` - dispatch on a ``--teacher`` string: a file path, or a factory
  ``module:function`` / ``path/to/file.py:function`` returning such a triple.

The trainer talks to the networks only through :meth:`Teacher.x0` (an x0 prediction in the
teacher's discrete VP convention; the host handles eps- vs v-prediction), the encoders, and
:meth:`Teacher.lora_targets` (host module -> kohya key via ComfyUI's diffusers<->ldm key map).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

from .algorithm import Cond
from .fileio import load_module

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SUPPORTED_CONFIGS = {"SD15": "sd15", "SD20": "sd2x", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                     "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
NATIVE_RESOLUTION = {"sd15": 512, "sd2x": 512, "sdxl": 1024}

#: The spec's LoRA module set (section 5.9), as diffusers module paths.
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

    cfg_name = type(model.model_config).__name__
    mt = getattr(model, "model_type", None)
    if mt in (mb.ModelType.FLOW, mb.ModelType.FLUX, mb.ModelType.FLOW_COSMOS) or "Flow" in type(model.model_sampling).__name__:
        raise TeacherError(f"the teacher is a flow-matching model ({cfg_name}): flow distillation isn't supported "
                           "yet; use an SD1.5, SD2.x or SDXL checkpoint")
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
    """kohya prefix -> UNet layer of a ``comfy.model_base.BaseModel``, for the spec's module set
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
    """The host's MODEL/CLIP/VAE triple as the trainer sees it."""

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
        self.uncond_zeros = self.arch == "sdxl"          # spec 5.6
        self.native_resolution = NATIVE_RESOLUTION[self.arch]
        if self.arch == "sd2x" and self.prediction == "v":
            self.native_resolution = 768
        self.device = torch.device("cpu")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._fingerprint = None

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
        u = self.unet
        return [*u.input_blocks, u.middle_block, *u.output_blocks]

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

    def make_cond(self, context: torch.Tensor, pooled: torch.Tensor | None, height: int, width: int) -> Cond:
        """Conditioning for images of ``height x width`` pixels (SDXL: the ADM vector from pooled + sizes)."""
        y = None
        if self.uses_adm:
            if pooled is None:
                raise TeacherError(f"{self.name}: the text encoder gave no pooled output, which this model needs")
            y = self.model.encode_adm(pooled_output=pooled.to(self.device), width=width, height=height,
                                      crop_w=0, crop_h=0, target_width=width, target_height=height)
        return Cond(context.to(self.device), None if y is None else y.to(self.device))

    def uncond(self, empty_context, empty_pooled, height: int, width: int) -> Cond:
        """The teacher's unconditional branch (spec 5.6): encoded empty prompt, or zeros for SDXL."""
        if self.uncond_zeros:
            empty_context = torch.zeros_like(empty_context)
            empty_pooled = None if empty_pooled is None else torch.zeros_like(empty_pooled)
        return self.make_cond(empty_context, empty_pooled, height, width)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` [B, 3, H, W] in [0, 1] -> x0 latents (VAE latent times the scaling factor)."""
        latent = self.vae.encode(pixels.movedim(1, -1).float())
        return self.model.process_latent_in(latent.float()).float().cpu()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents -> images [B, H, W, 3] in [0, 1]."""
        return self.vae.decode(self.model.process_latent_out(x0.float().cpu())).float().clamp(0, 1).cpu()


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

    model_options = {} if dtype is None else {"dtype": dtype}
    try:
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=None, model_options=model_options)
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


def load_teacher(spec, dtype: torch.dtype | None = None, device: str | None = None) -> Teacher:
    """``--teacher``: a checkpoint path, or ``module:function`` / ``file.py:function`` returning
    ``(model, clip, vae)`` built from host classes (called after ComfyUI is importable)."""
    ensure_host(device)
    if is_factory_spec(spec):
        triple = _load_factory(spec)()
        return Teacher(*triple[:3], name=str(spec))
    return load_checkpoint(spec, dtype)
