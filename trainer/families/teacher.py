"""One Teacher for every family ComfyUI runs: the loaded model evaluated the way the host samples it.

The host already knows, for each family it runs, three things the trainer needs, and this class asks
it rather than modelling families itself (docs/families.md; ``comfy_extras/nodes_train.py`` relies
on the same three):

- conditioning: text states, pooled vector, sizes and guidance go through the family's own
  ``BaseModel.extra_conds`` (what ``comfy.samplers.encode_model_conds`` calls), batched with the
  host's ``CONDType.concat``, then ``apply_model``;
- parameterisation and noise levels: ``model_sampling`` (eps, v and EDM in the host's
  variance-exploding space, ``CONST`` flow matching; its ``sigmas`` include the family's shift);
- guidance: CFG against the encoded empty prompt, or the guidance embedding where the transformer
  has one (``unet_config["guidance_embed"]``, FLUX-style).

What the host can't say is a row of :mod:`trainer.families.table`. A family the distillation can't
serve is refused by name before any work (:func:`family_problem`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import torch

from tdd_core import table_index

from ..algorithm import Cond, DiscreteSchedule
from ..flow import FLUX_GUIDANCE, FlowSchedule, flow_sigmas
from . import targets as tg
from .table import PREDICTIONS, REFUSED, UNSUPPORTED_PREDICTIONS, Row, family_name, row_for

log = logging.getLogger(__name__)

#: Generic (no row) native resolution: the host's latent_format does not name one; 1024 px is what
#: the transformer families of ComfyUI 0.33 are trained at.
DEFAULT_RESOLUTION = 1024


class TeacherError(RuntimeError):
    """The teacher can't be used; the message names the problem and the fix."""


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


def _parameterisation(model, sampling=None) -> str | None:
    """The host's parameterisation class name of ``model_sampling`` (the first known one in its MRO)."""
    for cls in type(sampling if sampling is not None else model.model_sampling).__mro__:
        if cls.__name__ in PREDICTIONS or cls.__name__ in UNSUPPORTED_PREDICTIONS:
            return cls.__name__
    return None


def prediction_of(model) -> str | None:
    """"eps" | "v" | "edm" | "flow" from the host's ``model_sampling`` class, or None (not distillable)."""
    return PREDICTIONS.get(_parameterisation(model))


def family_problem(model, sampling=None) -> str | None:
    """Why the trainer can't distil this host model (the family named), or None. Reads only classes and
    configs: cheap, so callers run it before any work (data, encoders, training). ``sampling``: the
    ``model_sampling`` a ModelPatcher's object patches give it (ModelSamplingDiscrete / SD3 / Flux nodes),
    which the model itself only gets once loaded."""
    config_name, base_name = type(model.model_config).__name__, type(model).__name__
    names = [c.__name__ for c in type(model).__mro__] + [config_name]
    for name in names:
        if name in REFUSED:
            return f"unsupported teacher architecture {config_name} ({base_name}): {REFUSED[name]}"
    kind = _parameterisation(model, sampling)
    if kind not in PREDICTIONS:
        why = UNSUPPORTED_PREDICTIONS.get(kind, "it is not eps, v, EDM or flow matching on a noise-level table")
        return (f"unsupported teacher {config_name} ({base_name}) with {kind or type(model.model_sampling).__name__} "
                f"sampling: {why}; the trainer distils eps-, v-, EDM- and flow-matching models (SD1.5, SD2.x, SDXL, "
                "FLUX.1-dev, SD3, FLUX.2, Qwen-Image, Lumina 2, Z-Image, Chroma, Wan, HunyuanVideo, AuraFlow...)")
    row = row_for(config_name)
    if row is not None and row.family == "flux" and not model.model_config.unet_config.get("guidance_embed"):
        return f"{config_name} without a guidance embedding is not supported: {REFUSED['FluxSchnell']}"
    if row is None and type(model).__name__ in ("BaseModel",):  # a UNet config the table doesn't know (SD-like)
        return (f"{config_name} is not supported: an SD-family UNet other than SD1.5, SD2.x and SDXL; pick one of "
                "those, or a transformer family ComfyUI runs")
    return None


@contextlib.contextmanager
def host_training():
    """The host's training mode for the duration (what its own TrainLoraNode sets): kernels without a
    backward (ComfyUI 0.33's fused rope) give way to differentiable ones."""
    import comfy.model_management as mm

    prev, mm.in_training = getattr(mm, "in_training", False), True  # (ComfyUI 0.3.52 has no such flag)
    try:
        yield
    finally:
        mm.in_training = prev


class Teacher:
    """The host's MODEL/CLIP/VAE triple as the trainer sees it, for any family (see the module doc)."""

    def __init__(self, patcher, clip, vae, name: str = "components"):
        self.patcher, self.clip, self.vae, self.name = patcher, clip, vae, name
        self.model = model = patcher.model                      # comfy.model_base.BaseModel
        problem = family_problem(model)
        if problem:
            raise TeacherError(f"{name}: {problem}")
        config_name = type(model.model_config).__name__
        self.row: Row = row_for(config_name) or Row(family_name(config_name), (config_name,), "generic route")
        self.arch = family_name(config_name)
        self._check_parts(clip, vae)
        self.unet = model.diffusion_model
        self.latent_dims = int(getattr(model.latent_format, "latent_dimensions", 2))
        self.prediction = prediction_of(model)
        self.flow = self.prediction == "flow"
        self.embedded_guidance = bool(model.model_config.unet_config.get("guidance_embed"))
        self.guidance = FLUX_GUIDANCE
        self.sigmas = self._sigmas()
        self.uncond_zeros = self.row.uncond == "zeros"
        self.native_resolution = self.row.native_resolution or DEFAULT_RESOLUTION
        if self.arch == "sd2x" and self.prediction == "v":
            self.native_resolution = 768
        self.text_tokens = self.row.text_tokens
        if self.text_tokens == 256:  # the tokenizer's own padded length (T5 for FLUX)
            self.text_tokens = int(getattr(clip, "tokenizer_options", {}).get("t5xxl_min_length", 256))
        self._lora_paths = None
        self._text_masks: bool | None = None   # the model gets text masks (known once the encoder ran)
        self._mask_keys: tuple[str, ...] = ()   # the model inputs extra_conds makes of a text mask
        self._check_conditioning()
        self._freeze()
        if self.row.inplace_residuals:
            tg.trainable_blocks(self.checkpoint_blocks())

    def _check_parts(self, clip, vae) -> None:
        """A text encoder and a VAE are needed (captions and images are encoded here), of the kind the
        row names where only one will do."""
        row, name = self.row, self.name
        kind = "FLUX diffusion model" if row.family == "flux" else f"{row.family} model"
        missing = [what for what, obj in (("text encoders" if row.text_encoder else "text encoder", clip),
                                          ("VAE", vae)) if obj is None]
        if missing:
            hint = row.files_hint or "give the model with them (a full checkpoint, or the loaders' outputs)"
            raise TeacherError(f"{name} is a {kind} without its {' and '.join(missing)}: {hint}")
        te = type(getattr(clip, "cond_stage_model", None))
        if row.text_encoder and row.text_encoder not in [c.__name__ for c in te.__mro__]:
            te = te.__name__
            raise TeacherError(f"{name}: the text encoder is {te}, not FLUX's CLIP-L + T5-XXL pair; {row.files_hint}")

    def _sigmas(self) -> torch.Tensor:
        """The trainer's 1000 noise levels (``k = 0..999``): the host's table (shift included) as it is when
        it has 1000 levels, else the levels TDD Scheduler samples a timestep at (``tdd_core.table_index``;
        FLUX-type sampling keeps 10000)."""
        if self.row.schedule == "flux-unshifted":
            return flow_sigmas().float()
        sigmas = self.model.model_sampling.sigmas.detach().float().cpu()
        n = sigmas.numel()
        if n == 1000:
            return sigmas
        if n < 1000:
            raise TeacherError(f"{self.name}: the trainer needs a noise table of at least 1000 levels, the host's "
                               f"has {n}")
        return sigmas[[table_index(k, n) for k in range(1000)]].contiguous()

    def _check_conditioning(self) -> None:
        """Refuse (by name) a model whose conditioning needs more than a prompt: an image or mask
        concatenated to its input (inpainting, instruct, image-to-video), as its ``concat_cond`` says."""
        c = int(self.model.latent_format.latent_channels)
        noise = torch.zeros(1, c, *([1] * (self.latent_dims - 2)), 8, 8)
        try:
            concat = self.model.concat_cond(noise=noise, latent_image=noise, device=torch.device("cpu"))
        except Exception as e:  # a concat input the host can't even blank: it needs one
            concat = e
        if concat is not None:
            raise TeacherError(f"{self.name}: {type(self.model.model_config).__name__} is not supported: it "
                               "concatenates an image or mask to its input (inpainting/instruct/image-to-video, "
                               "HunyuanVideo 1.5), which the trainer does not supply; use a text-to-image/video model")

    def _freeze(self) -> None:
        self.device = torch.device("cpu")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._fingerprint = None

    # ---- the family's algebra ----------------------------------------------------------------
    def schedule(self, cfg=None):
        """Noise levels, moves and teacher step for :func:`trainer.algorithm.compute_loss`: the discrete
        (VP view of the host's VE) schedule, or flow matching with CFG or the guidance embedding
        (``cfg.flux_guidance`` / ``cfg.flux_guidance_range``)."""
        if not self.flow:
            return DiscreteSchedule(self.sigmas)
        if cfg is not None and self.embedded_guidance:
            self.guidance = float(cfg.flux_guidance)
        rng = getattr(cfg, "flux_guidance_range", None) if self.embedded_guidance else None
        sigmas = None if self.row.schedule == "flux-unshifted" else self.sigmas
        return FlowSchedule(rng, sigmas=sigmas, cfg=not self.embedded_guidance)

    def space(self):
        """tdd_core's sampling space of this model (validation grids)."""
        from tdd_core import FlowMatching, VarianceExploding
        return FlowMatching() if self.flow else VarianceExploding(self.sigmas.to(self.device))

    def start_latent(self, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The sampler's first latent from unit noise at the top level ``sigma`` (the host's full-denoise
        noise scaling)."""
        return noise * sigma if self.flow else noise * (1.0 + sigma ** 2) ** 0.5

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = f"{self.arch}-{model_fingerprint(self.unet)}"
        return self._fingerprint

    # ---- placement ---------------------------------------------------------------------------
    def to(self, device) -> "Teacher":
        """Move the diffusion model to ``device`` (outside ComfyUI's model management, so it is never
        offloaded behind the trainer's back; CLIP and VAE are loaded/offloaded by the host as usual)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def training(self):
        """A context for the training steps: the host's training mode (:func:`host_training`)."""
        return host_training()

    # ---- LoRA targets ------------------------------------------------------------------------
    def lora_targets(self) -> dict:
        if self.row.lora == "kohya-unet":
            return tg.kohya_unet_targets(self.model)
        if self.row.lora == "flux-peft":
            targets, self._lora_paths = tg.flux_peft_targets(self.model)
            return targets
        return tg.host_targets(self.model)

    def lora_file_keys(self, sd: dict) -> dict:
        """The trainer's LoRA tensors under the keys of this family's output file (kohya / host-generic
        keys as they are; FLUX.1: PEFT names)."""
        if self.row.lora != "flux-peft":
            return sd
        if self._lora_paths is None:
            self.lora_targets()
        return tg.peft_file_keys(sd, self._lora_paths)

    def checkpoint_blocks(self) -> list[torch.nn.Module]:
        """The units gradient checkpointing recomputes: the SD UNet's layers, else the transformer's blocks."""
        if self.row.lora == "kohya-unet":
            return tg.unet_layers(self.model)
        return [block for _, blocks in tg.block_lists(self.model) for block in blocks]

    # ---- networks ----------------------------------------------------------------------------
    def _host_input(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The trainer's latent -> the host's model input: flow as it is; VP ``z`` -> VE ``z sqrt(1 + sigma^2)``."""
        if self.flow:
            return z
        return z * (1.0 + sigma.view(-1, *[1] * (z.ndim - 1)) ** 2).sqrt()

    def x0(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x0 prediction for latents ``z`` at integer timesteps ``t`` (the host converts from eps/v/flow
        outputs; ``z`` is the VP latent for eps/v/EDM families, the flow state for flow families)."""
        sigma = self.sigmas[t.long().cpu()].to(z.device)
        with host_training() if torch.is_grad_enabled() else contextlib.nullcontext():
            return self._apply(self._host_input(z, sigma), sigma, self._kwargs(cond, z.shape[0]))

    def _apply(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The host's ``apply_model``. Where the row says so (:attr:`Row.text_per_sample`), the text mask is
        left out when nothing is masked, and padded captions run one sample at a time, each with its own
        text states only (as the host evaluates a prompt)."""
        if not (self.row.text_per_sample and self._mask_keys):
            return self.model.apply_model(x, sigma, **kwargs)
        mask = kwargs.get(self._mask_keys[0])
        kwargs = {k: v for k, v in kwargs.items() if k not in self._mask_keys}
        if mask is None or bool(mask.all()):
            return self.model.apply_model(x, sigma, **kwargs)
        n, out = x.shape[0], []
        for i in range(n):
            one = {k: v[i:i + 1] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in kwargs.items()}
            one["c_crossattn"] = one["c_crossattn"][:, mask[i].bool()]
            out.append(self.model.apply_model(x[i:i + 1], sigma[i:i + 1], **one))
        return torch.cat(out)

    def _kwargs(self, cond: Cond, n: int) -> dict:
        kwargs = cond.model_kwargs()
        if self.embedded_guidance and kwargs.get("guidance") is None:
            kwargs["guidance"] = torch.full((n,), self.guidance, device=cond.context.device)
        elif "guidance" in kwargs and kwargs["guidance"] is not None:
            kwargs["guidance"] = kwargs["guidance"].float()
        return kwargs

    def denoiser(self, cond: Cond):
        """``model(x, sigma) -> x0`` in the host's space, for :func:`tdd_core.sample_tdd`."""
        def model(x, sigma, **_):
            return self._apply(x, sigma, self._kwargs(cond, x.shape[0]))
        return model

    def guided_denoiser(self, cond: Cond, empty: Cond, scale: float):
        """:meth:`denoiser` with TDD Guidance: the guidance embedding at ``scale`` (one pass, no empty
        prompt), or CFG at ``scale`` against the encoded empty prompt ``empty`` (one batched forward for
        both; ``scale`` 1 is one conditional pass)."""
        if self.embedded_guidance:
            return self.denoiser(cond.with_guidance(torch.full((cond.context.shape[0],), float(scale))))
        if scale == 1.0:
            return self.denoiser(cond)
        from tdd_core import cfg as guided
        n = cond.context.shape[0]
        both = cond.cat(empty.expand(n))

        def model(x, sigma, **_):
            c, u = self._apply(torch.cat([x, x]), torch.cat([sigma, sigma]), self._kwargs(both, 2 * n)).chunk(2)
            return guided(c, u, scale)
        return model

    def default_reference_guidance(self) -> float:
        """The teacher's guidance for a reference image: the guidance embedding's usual 3.5 (ComfyUI's
        FluxGuidance default), or CFG 4.5 (the trainer's teacher guidance 3.5 in the CFG convention 1 + w)."""
        return 3.5 if self.embedded_guidance else 4.5

    def latent_shape(self, resolution: int, frames: int = 1) -> tuple[int, ...]:
        """The x0 latent of a ``resolution`` x ``resolution`` image ((channels, h, w)), or of a clip of
        ``frames`` frames for a video family ((channels, latent frames, h, w))."""
        f = self.latent_factor
        c = int(self.model.latent_format.latent_channels)
        if self.latent_dims == 3:
            return c, self.latent_frames(frames), resolution // f, resolution // f
        return c, resolution // f, resolution // f

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame clip (the VAE's temporal compression, causal first frame)."""
        ratio = getattr(self.vae, "downscale_ratio", None)   # the host VAE's (frames fn, h, w) for video VAEs
        if isinstance(ratio, tuple) and callable(ratio[0]):
            return int(ratio[0](max(frames, 1)))
        return max(frames, 1)

    def model_size(self, resolution: int, frames: int = 1, text_tokens: int = 77, lora_params: int = 0):
        """What :mod:`trainer.memory` estimates from, read off the host model: parameters, the transformer
        width (the most common input width of the blocks' Linear layers), the blocks, and the tokens one
        sample of ``resolution`` px (``frames`` frames) puts through them after the model's patching."""
        from collections import Counter

        from ..memory import ModelSize

        widths = Counter(m.in_features for block in self.checkpoint_blocks() for m in block.modules()
                         if isinstance(m, torch.nn.Linear))
        width = widths.most_common(1)[0][0] if widths else int(self.model.model_config.unet_config.get(
            "model_channels", 320))
        patch = self.model.model_config.unet_config.get("patch_size", 1)
        patch_area = patch * patch if isinstance(patch, int) else int(torch.tensor(list(patch)[-2:]).prod())
        shape = self.latent_shape(resolution, frames)
        positions = int(torch.tensor(shape[1:]).prod()) // max(patch_area, 1)
        return ModelSize(params=sum(p.numel() for p in self.model.diffusion_model.parameters()), width=width,
                         blocks=len(self.checkpoint_blocks()), tokens=positions + text_tokens, lora_params=lora_params)

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

    # ---- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per caption: text states [B, L, D] and pooled [B, P] (or None), L fixed per family so that
        captions batch: one 77-token chunk (SD rows), the tokenizer's padded length cut to
        :attr:`text_tokens`, or (generic) the encoder's output padded with zeros to the longest.

        Where the encoder also returns an attention mask (LLM encoders: HunyuanVideo's, LTX-Video's,
        Lumina 2's...), the states it masks out are zeroed here, and :meth:`make_cond` gives the model
        the mask of the non-zero states: the caption's own mask, with any padding masked too."""
        ctxs, pools = [], []
        for caption in captions:
            tokens = self.clip.tokenize(caption)
            if self.text_tokens == "first-chunk":
                tokens = {k: v[:1] for k, v in tokens.items()}
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            ctx, pooled, mask = out["cond"], out.get("pooled_output"), out.get("attention_mask")
            if self._text_masks is None:
                self._text_masks = mask is not None and self._takes_mask(ctx, pooled)
            if self._text_masks and mask is not None:
                ctx = ctx * mask[..., :ctx.shape[1], None].to(ctx.dtype)
            if isinstance(self.text_tokens, int):
                ctx = ctx[:, :self.text_tokens]
            ctxs.append(ctx.float().cpu())
            pools.append(None if pooled is None else pooled.float().cpu())
        longest = max(c.shape[1] for c in ctxs)
        ctxs = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in ctxs]
        pooled = None if any(p is None for p in pools) else torch.cat(pools)
        return torch.cat(ctxs), pooled

    def _extra_conds(self, context, pooled, height: int, width: int, geometry, mask=None) -> dict:
        """The family's model conds for one sample, from its own ``extra_conds`` (as
        ``comfy.samplers.encode_model_conds`` calls it: noise, device, sizes; SDXL's crop)."""
        f = self.latent_factor if self.vae is not None else 8
        c = int(self.model.latent_format.latent_channels)
        noise = torch.zeros(1, c, *([1] * (self.latent_dims - 2)), max(height // f, 1), max(width // f, 1))
        oh, ow, top, left = geometry or (height, width, 0, 0)
        kwargs = dict(noise=noise, latent_image=noise, device=self.device, width=ow, height=oh, crop_h=top, crop_w=left,
                      target_height=height, target_width=width, cross_attn=context, prompt_type="positive")
        if mask is not None:
            kwargs["attention_mask"] = mask
        if pooled is not None:
            kwargs["pooled_output"] = pooled
        if self.embedded_guidance:
            kwargs["guidance"] = self.guidance
        return self.model.extra_conds(**kwargs)

    @property
    def text_masks(self) -> bool:
        """Whether the model gets the text encoder's attention masks (:meth:`encode_text`): the encoder
        returns them and the family's ``extra_conds`` takes one (HunyuanVideo, LTX-Video, Mochi, Cosmos...).
        Where the model has no use for it (FLUX.2's, Qwen-Image's), the states stay as the host gives them."""
        if self._text_masks is None:
            self.encode_text([""])
        return bool(self._text_masks)

    def _takes_mask(self, context: torch.Tensor, pooled: torch.Tensor | None) -> bool:
        """Does ``extra_conds`` pass an attention mask (one with a masked position) on to the model as it is?
        The model inputs it makes of it are remembered (:meth:`make_cond` gives them every sample's mask)."""
        context = torch.nn.functional.pad(context.float(), (0, 0, 0, 1)).to(self.device)
        pooled = None if pooled is None else pooled.float().to(self.device)
        without = self._extra_conds(context, pooled, 64, 64, None)
        mask = torch.ones(context.shape[:2], dtype=torch.long)
        mask[:, -1] = 0
        with_mask = self._extra_conds(context, pooled, 64, 64, None, mask.to(self.device))
        keys = []
        for key in sorted(set(with_mask) - set(without)):
            value = with_mask[key].process_cond(batch_size=1, area=None, device=self.device).cond
            if torch.is_tensor(value) and value.shape == mask.shape and torch.equal(value.long().cpu(), mask):
                keys.append(key)
        self._mask_keys = tuple(keys)
        return bool(keys)

    def make_cond(self, context: torch.Tensor, pooled: torch.Tensor | None, height: int, width: int,
                  geometry=None) -> Cond:
        """Conditioning for images of ``height x width`` pixels through the family's ``extra_conds``,
        batched with the host's ``CONDType.concat``. ``geometry``: per sample ``(original_h, original_w,
        crop_top, crop_left)`` for size-conditioned families (SDXL; default: the whole image, uncropped)."""
        n = context.shape[0]
        geometry = geometry or [None] * n
        per_sample = [self._extra_conds(context[i:i + 1].to(self.device),
                                        None if pooled is None else pooled[i:i + 1].to(self.device),
                                        height, width, geometry[i]) for i in range(n)]
        out = {}
        for key in per_sample[0]:
            if key == "c_concat":
                raise TeacherError(f"{self.name}: the conditioning concatenates an image to the input, which the "
                                   "trainer can't supply")
            first, *rest = [conds[key].process_cond(batch_size=1, area=None, device=self.device)
                            for conds in per_sample]
            value = first.concat(rest) if rest else first.cond
            out[key] = value.to(self.device) if torch.is_tensor(value) else value
        if self.text_masks:
            # every sample's mask under the keys extra_conds gives it, also when nothing is masked (the
            # conditionings of one teacher then batch together: CFG's, the empty-prompt draws')
            masks = text_mask(context).to(self.device)
            out.update({key: masks for key in self._mask_keys})
        context_out = out.pop("c_crossattn")
        y = out.pop("y", None)
        guidance = out.pop("guidance", None)  # CFG families: a fixed value the host passes (Chroma's 0) stays
        if self.embedded_guidance:
            guidance = torch.full((n,), self.guidance, device=self.device)
        elif guidance is not None:
            out["guidance"], guidance = guidance, None
        return Cond(context_out, y, guidance, out or None)

    def uncond(self, empty_context, empty_pooled, height: int, width: int, geometry=None) -> Cond:
        """The teacher's unconditional branch (docs/method.md §5, step 6): the encoded empty prompt, or
        zeros where the row says so (SDXL; text only: the size conditioning stays the sample's)."""
        if self.uncond_zeros:
            empty_context = torch.zeros_like(empty_context)
            empty_pooled = None if empty_pooled is None else torch.zeros_like(empty_pooled)
        return self.make_cond(empty_context, empty_pooled, height, width, geometry)

    # ---- the VAE -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` [B, 3, H, W] in [0, 1] -> x0 latents (the VAE latent in the model's space)."""
        latent = self.vae.encode(pixels.movedim(1, -1).float())
        return self.model.process_latent_in(latent.float()).float().cpu()

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD/SDXL/FLUX.1 VAEs, 16 for some)."""
        return int(self.vae.spacial_compression_encode())

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` [B, 3, H, W] (a video family: [B, 3, T, H, W]) in [0, 1] -> the VAE posterior (mean,
        log-variance) in the VAE's own latent space (see :meth:`latent_in`). The host's encode returns
        the posterior's mode; here its Gaussian regulariser is bypassed for one call to get both moments.
        A VAE without one (deterministic encoder) gives log-variance -inf: every draw is the mean."""
        import comfy.ldm.models.autoencoder as autoencoder

        if pixels.ndim == 4 and getattr(self.vae, "latent_dim", 2) == 3:
            pixels = pixels.unsqueeze(2)  # a video VAE (Wan's, also Qwen-Image's): images are 1-frame clips
        frames = pixels.movedim(1, -1).float()
        if pixels.ndim == 5:  # [B, 3, T, H, W] -> the host's video layout, one clip at a time: [T, H, W, 3]
            means = [self.vae.encode(frames[i]).float().cpu() for i in range(pixels.shape[0])]
            mean = torch.cat(means)
            return mean, torch.full_like(mean, float("-inf"))
        fsm = self.vae.first_stage_model
        reg = getattr(fsm, "regularization", None)
        if not isinstance(reg, autoencoder.DiagonalGaussianRegularizer):
            mean = self.vae.encode(frames).float().cpu()
            return mean, torch.full_like(mean, float("-inf"))
        fsm.regularization = _PassThrough()
        try:
            moments = self.vae.encode(frames).float().cpu()
        finally:
            fsm.regularization = reg
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(-30.0, 20.0).contiguous()  # the host's DiagonalGaussian clamp

    def latent_in(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE-space latent -> the model's x0 space (the latent format's scale and shift)."""
        return self.model.process_latent_in(z.float()).float().cpu()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents -> images [B, H, W, 3] in [0, 1] (video: frames)."""
        return self.vae.decode(self.model.process_latent_out(x0.float().cpu())).float().clamp(0, 1).cpu()


def text_mask(context: torch.Tensor) -> torch.Tensor:
    """The attention mask [B, L] of text states [B, L, D] whose masked-out and padded positions are zero
    (:meth:`Teacher.encode_text`): 1 where a state is non-zero, as the host's encoders give it (int64).
    A caption with no state left keeps its first position (an all-masked row has no attention)."""
    mask = context.ne(0).any(-1).long()
    mask[mask.sum(1) == 0, 0] = 1
    return mask


class _PassThrough(torch.nn.Module):
    """A regulariser that returns the encoder's moments as they are (the host's EmptyRegularizer,
    which ComfyUI 0.3.52 does not have)."""

    def forward(self, z):
        return z, None
