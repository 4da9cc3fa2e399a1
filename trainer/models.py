"""The model seam's loaders: how the trainer gets a ComfyUI model to distil (imports ComfyUI).

The Teacher itself - one class for every family, evaluated the way the host samples it - is
:mod:`trainer.families` (its per-family facts are the table :mod:`trainer.families.table`). Here:

- :func:`load_checkpoint` - a single-file checkpoint through the host's own loader
  (``comfy.sd.load_checkpoint_guess_config``), so whatever checkpoint ComfyUI loads can be distilled;
- :func:`from_components` - an already-built ``(ModelPatcher, CLIP, VAE)`` (the host's loaders'
  outputs in a graph, the pack's tiny model, test models built from host classes with random weights);
- :func:`load_flux_files` - FLUX.1 kept as separate files (diffusion model, CLIP-L + T5-XXL, VAE)
  through the host's UNETLoader / DualCLIPLoader / VAELoader functions;
- :func:`load_teacher` - dispatch on a ``--teacher`` string: a file path, or a factory
  ``module:function`` / ``path/to/file.py:function`` returning such a triple.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import torch

from .families import Teacher, TeacherError, model_fingerprint  # noqa: F401  (the seam's public names)
from .families.table import FLUX_FILES_HINT
from .families.targets import kohya_unet_targets as lora_targets  # noqa: F401
from .families.targets import flux_peft_targets as flux_lora_targets  # noqa: F401
from .fileio import load_module

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


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


def load_flux_files(unet, clips, vae, dtype: torch.dtype | None = None) -> Teacher:
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
