"""Training configuration: one dataclass, filled from defaults < TOML file (``--config``) < flags."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .calibrate import CRITERIA, DEFAULT_BUDGET, DEFAULT_CRITERION
from .flow import FLUX_DEFAULTS, FLUX_METHODS

METHODS = ("tdd", "tcd", "lcm")
LOSSES = ("huber", "l2")
SCHEDULES = ("constant", "warmup", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8")


class ConfigError(ValueError):
    """A bad setting; the message names it and the fix."""


@dataclass
class TrainConfig:
    # inputs / outputs
    teacher: str | None = None          # single-file checkpoint, or "module:function" / "file.py:function" factory
    unet: str | None = None             # FLUX as separate files: the diffusion model (with clip and vae)
    clip: list[str] = field(default_factory=list)  # FLUX text encoders: CLIP-L and T5-XXL
    vae: str | None = None              # FLUX VAE (ae.safetensors)
    data: str | None = None             # image folder with .txt captions, or a .jsonl of {path, caption}
    out: str = "tdd_lora.safetensors"
    overwrite: bool = False             # replace an existing --out of another run (a resumed run's own: always)
    run_dir: str | None = None          # checkpoints, logs, validation images (default: <out stem>_run)
    resume: str | None = None
    # algorithm (docs/method.md §5)
    method: str = "tdd"
    kmin: int = 4
    kmax: int = 8
    eta_max: float = 0.3
    empty_prompt_prob: float | None = None  # None: the family's default (FAMILY_DEFAULTS)
    teacher_guidance: float = 3.5
    flux_guidance: float = 1.5          # FLUX's guidance embedding (student, teacher and target alike)
    flux_guidance_range: list[float] | None = None  # [lo, hi]: draw it per sample from U(lo, hi) instead
    loss: str | None = None
    huber_c: float = 0.001
    rank: int = 64
    alpha: float = 8.0
    # the adversarial variant (docs/method.md §5.2)
    adversarial: bool = False
    adv_weight: float = 0.1             # weight of the generator hinge term in the student's loss
    adv_lr: float = 1e-5                # the discriminator heads' AdamW (betas (0, 0.999), weight decay 1e-3)
    # optimisation
    lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 1                 # per process, per micro-batch
    grad_accum: int = 1
    accumulate_to: int | None = None    # a global batch: sets grad_accum = it / (batch_size x processes)
    max_steps: int = 1000
    grad_clip: float = 1.0
    precision: str = "auto"             # autocast dtype
    base_dtype: str = "auto"            # storage dtype of the frozen base (auto: fp32, as the reference)
    gradient_checkpointing: bool = False
    fsdp: bool = False                  # shard the frozen base over the torchrun processes (FSDP2 fully_shard)
    seed: int = 0
    # data
    resolution: int | None = None       # default: the architecture's native size
    cache_dir: str | None = None
    num_workers: int = 2
    center_crop: bool = False           # default: a random crop per sample (the reference's)
    frames: int = 1                     # frames per training clip (video families); 1: images and first frames
    strict_data: bool = False           # a bad image or caption is an error before training, not skipped
    preset: str | None = None           # trainer/presets/<name>.toml under the TOML file and the flags
    # bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_seed: int = 0
    log_every: int = 1
    save_dtype: str = "fp16"
    device: str = "auto"
    progress: bool = True
    # recommended sampler settings measured after the last step (trainer/calibrate.py)
    calibrate: bool = True
    calibrate_budget: float = DEFAULT_BUDGET  # calibration's cost: at most this fraction of the training run
    calibrate_prompts: int | None = None  # prompts per setting; None: the budget rule's (set: the full sweep)
    calibrate_steps: list[int] | None = None  # step counts swept; None: the budget rule's (set: these, no budget)
    calibrate_criterion: str = DEFAULT_CRITERION
    # not a setting: the number of processes (torchrun's WORLD_SIZE)
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")),
                            metadata={"setting": False})

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes: batch size x accumulation x processes."""
        return self.batch_size * self.grad_accum * self.world_size

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ConfigError(msg)
        if not self.teacher and not self.unet:
            bad("no teacher: pass --teacher path/to/model.safetensors (an SD1.5, SD2.x, SDXL or all-in-one FLUX "
                "checkpoint), or FLUX as --unet flux1-dev.safetensors --clip clip_l.safetensors "
                "--clip t5xxl_fp16.safetensors --vae ae.safetensors")
        if self.unet and self.teacher:
            bad("pass either --teacher (one checkpoint) or --unet/--clip/--vae (FLUX as separate files), not both")
        if self.unet and (len(self.clip) != 2 or not self.vae):
            bad(f"--unet {self.unet} needs its two text encoders and its VAE: add --clip clip_l.safetensors "
                "--clip t5xxl_fp16.safetensors --vae ae.safetensors")
        if not self.unet and (self.clip or self.vae):
            bad("--clip/--vae go with --unet (FLUX as separate files); a --teacher checkpoint brings its own")
        if self.flux_guidance_range is not None:
            r = list(self.flux_guidance_range)
            if len(r) != 2 or not 0.0 <= r[0] <= r[1]:
                bad(f"--flux-guidance-range needs two values 0 <= LO <= HI (the reference's is 0 3), got {r}")
        if not self.data:
            bad("no training data: pass --data DIR (images with same-named .txt captions) or --data file.jsonl")
        if self.method not in METHODS:
            bad(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.loss is not None and self.loss not in LOSSES:
            bad(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.lr_schedule not in SCHEDULES:
            bad(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            bad(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if int(self.frames) < 1:
            bad(f"--frames must be >= 1, got {self.frames}")
        if self.base_dtype not in BASE_DTYPES:
            bad(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.save_dtype not in ("fp16", "bf16", "fp32"):
            bad(f"--save-dtype must be fp16, bf16 or fp32, got {self.save_dtype!r}")
        if not (1 <= self.kmin <= self.kmax <= 50):
            bad(f"need 1 <= --kmin <= --kmax <= 50, got kmin={self.kmin} kmax={self.kmax}")
        if not 0.0 <= self.eta_max <= 1.0:
            bad(f"--eta-max must be in [0, 1] (reference 0.3), got {self.eta_max}")
        if self.empty_prompt_prob is not None and not 0.0 <= self.empty_prompt_prob <= 1.0:
            bad(f"--empty-prompt-prob must be in [0, 1], got {self.empty_prompt_prob}")
        if self.calibrate_criterion not in CRITERIA:
            bad(f"--calibrate-criterion must be one of {', '.join(CRITERIA)}, got {self.calibrate_criterion!r}")
        for name in ("rank", "batch_size", "grad_accum", "max_steps", "save_every", "keep_checkpoints", "log_every",
                     "calibrate_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.calibrate_budget > 0:
            bad(f"--calibrate-budget is a fraction of the training run's cost (default {DEFAULT_BUDGET}), > 0; got "
                f"{self.calibrate_budget}. For no calibration pass --no-calibrate")
        if self.calibrate_steps is not None and (not self.calibrate_steps or not all(
                isinstance(k, int) and 1 <= k <= 50 for k in self.calibrate_steps)):
            bad(f"--calibrate-steps needs step counts from 1 to 50 (e.g. 2 4 6 8), got {self.calibrate_steps}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.lr is not None and self.lr <= 0:
            bad(f"--lr must be > 0, got {self.lr}")
        if self.accumulate_to is not None and self.accumulate_to < 1:
            bad(f"--accumulate-to must be >= 1, got {self.accumulate_to}")
        if self.adversarial and self.method == "lcm":
            bad("--adversarial needs --method tdd or tcd (its discriminator compares predictions at the target s)")
        if self.adv_weight < 0 or self.adv_lr <= 0:
            bad(f"need --adv-weight >= 0 and --adv-lr > 0, got {self.adv_weight} and {self.adv_lr}")
        return self

    def fingerprint_fields(self, dataset_id: str, teacher_id: str, precision: tuple[str, str] = ("fp32", "fp32"),
                           embedded_guidance: bool = False) -> dict:
        """Settings that change the training trajectory: a resumed run must match them all. ``precision``:
        the resolved (autocast, frozen-base) dtypes (:func:`trainer.loop.resolve_precision`), since ``auto``
        means different ones on different hardware. Not here, because they don't change the result: paths,
        --overwrite, --strict-data, workers, device, process count (the global batch is here), gradient
        checkpointing, the cache, save/log/validation settings, --max-steps unless the schedule is cosine.
        ``embedded_guidance``: the teacher takes a guidance embedding (FLUX.1-dev, FLUX.2, HunyuanVideo...),
        so --flux-guidance and its range steer the targets."""
        fields = {k: getattr(self, k) for k in (
            "method", "kmin", "kmax", "eta_max", "empty_prompt_prob", "teacher_guidance", "loss", "huber_c", "rank",
            "alpha", "lr", "lr_schedule", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
            "grad_clip", "seed", "resolution")}
        for k, v in fields.items():  # 2 and 2.0 (TOML/flags/Python) are the same setting
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("kmin", "kmax", "rank", "seed",
                                                                                     "warmup_steps", "resolution"):
                fields[k] = float(v)
        fields["global_batch"] = self.global_batch
        if self.lr_schedule == "cosine":
            fields["max_steps"] = self.max_steps
        if self.adversarial:  # (absent when off, so plain runs keep their fingerprints)
            fields.update(adversarial=True, adv_weight=float(self.adv_weight), adv_lr=float(self.adv_lr))
        if self.center_crop:  # (absent when off, as above)
            fields["center_crop"] = True
        if self.frames != 1:
            fields["frames"] = int(self.frames)
        for name, dtype in zip(("precision", "base_dtype"), precision):
            if dtype != "fp32":  # (absent for fp32, as above)
                fields[name] = dtype
        fields["dataset"] = dataset_id
        fields["teacher"] = teacher_id
        if embedded_guidance or teacher_id.startswith("flux-"):
            fields["flux_guidance"] = float(self.flux_guidance)
            fields["flux_guidance_range"] = None if self.flux_guidance_range is None else [
                float(v) for v in self.flux_guidance_range]
        return fields

    def resolve_accumulation(self) -> "TrainConfig":
        """``accumulate_to`` (a preset's global batch) -> ``grad_accum`` for this batch size and process count."""
        if self.accumulate_to:
            per_step = self.batch_size * self.world_size
            if self.accumulate_to % per_step:
                raise ConfigError(f"--accumulate-to {self.accumulate_to} (the global batch) is not a multiple of "
                                  f"--batch-size {self.batch_size} x {self.world_size} process(es): pick a batch "
                                  "size that divides it, or set --grad-accum yourself")
            self.grad_accum = self.accumulate_to // per_step
        return self

    def apply_family_defaults(self, arch: str, defaults: str | None = None, flow: bool | None = None) -> "TrainConfig":
        """Fill the settings left unset (None) with the teacher family's defaults; refuse what the family
        can't do. Called once the teacher is loaded, before the run's fingerprint. ``defaults``: "sd" or
        "flux" (default: by ``arch``); ``flow``: a flow-matching family (default: FLUX.1)."""
        family = defaults or ("flux" if arch == "flux" else "sd")
        flow = (arch == "flux") if flow is None else flow
        for name, value in FAMILY_DEFAULTS[family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if flow and self.method not in FLUX_METHODS:
            raise ConfigError(f"--method {self.method} is not supported for flow-matching ({arch.upper()}) teachers: its "
                              "boundary conditions belong to the discrete DDPM schedule; use --method tdd (default) "
                              "or tcd")
        return self


#: Defaults of the settings that differ by teacher family (SD: docs/method.md §5; FLUX: docs/method.md §5.1).
FAMILY_DEFAULTS = {
    "sd": {"loss": "huber", "lr": 1e-6, "weight_decay": 0.0, "empty_prompt_prob": 0.2},
    "flux": FLUX_DEFAULTS,
}


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` a user sets (flags, TOML)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("setting", True)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill.py",
        description="Distil an SD1.5/SD2.x/SDXL or FLUX.1-dev model into a Target-Driven Distillation (TDD) LoRA. "
                    "Flags override the TOML --config file, which overrides the defaults.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML file with any of the settings below (names with - or _)")
    helps = {
        "teacher": "teacher checkpoint (.safetensors/.ckpt), or a factory 'module:function' returning (model, clip, vae)",
        "unet": "FLUX diffusion-model file (as ComfyUI's UNETLoader loads it), with --clip twice and --vae",
        "clip": "FLUX text encoder file: give it twice, CLIP-L and T5-XXL (as DualCLIPLoader type flux)",
        "vae": "FLUX VAE file (ae.safetensors)",
        "flux_guidance": "FLUX guidance embedding during training (reference 1.5)",
        "flux_guidance_range": "draw FLUX's guidance per sample from U(LO, HI) instead (reference adversarial: 0 3)",
        "loss": "huber (pseudo-Huber) or l2; default huber for SD, l2 for FLUX",
        "lr": "learning rate; default 1e-6 for SD (reference), 1e-4 for FLUX (reference)",
        "weight_decay": "AdamW weight decay; default 0 for SD, 1e-2 for FLUX",
        "empty_prompt_prob": "probability of training on the empty prompt; default 0.2 for SD, 0 for FLUX",
        "data": "folder of images with same-named .txt captions, or a .jsonl of {\"path\", \"caption\"}",
        "out": "output LoRA file (default tdd_lora.safetensors); an existing file of another run is refused "
               "unless --overwrite",
        "overwrite": "replace an existing --out from another run (a resumed run always replaces its own)",
        "strict_data": "stop before training when any image is corrupt, truncated, empty or not an image, or a "
                       "caption is not UTF-8 (default: skip each with a warning, counted in the LoRA's metadata)",
        "run_dir": "folder for checkpoints, log.csv and validation grids (default: <out>_run)",
        "resume": "continue from a run folder or one of its checkpoint-NNNNNN folders",
        "method": "target selection: tdd (default), tcd, lcm",
        "eta_max": "largest target shrink (s = floor((1 - u*eta_max) * tau)); reference 0.3",
        "teacher_guidance": "teacher guidance w (LCM convention, eps_c + w (eps_c - eps_u)); reference 3.5",
        "resolution": "training resolution (default: 512 SD1.5/SD2 base, 768 SD2 v, 1024 SDXL)",
        "cache_dir": "cache VAE posteriors (mean, log-variance) and text embeddings here (computed once, reused by "
                     "later runs; a fresh latent is drawn from the posterior for every sample)",
        "center_crop": "crop each image's centre instead of a random crop per sample (the reference's default)",
        "frames": "frames per training clip for video families: video files (.mp4/.webm/.mov/.mkv/.avi) and folders of "
                  "frames captioned by a same-named .txt; 1 (default) trains on images and each clip's first frame",
        "precision": "autocast precision: auto (bf16, or fp16 without bf16, on GPU; fp32 on CPU), fp32, bf16, fp16",
        "base_dtype": "storage dtype of the frozen base model: auto (fp32, as the reference), or bf16/fp16/fp8 to "
                      "save memory (noisier targets: see docs/trainer.md)",
        "preset": "the reference's hyper-parameters for a family (trainer/presets/NAME.toml): sd15, sdxl, sdxl-adv, "
                  "flux; the --config file and flags override it",
        "accumulate_to": "global batch to reach by gradient accumulation: --grad-accum = N / (batch x processes)",
        "adversarial": "the adversarial variant (docs/method.md 5.2): discriminator heads on the frozen teacher",
        "adv_weight": "weight of the generator (hinge) term in the student's loss; reference 0.1",
        "adv_lr": "learning rate of the discriminator heads (AdamW betas 0/0.999, weight decay 1e-3); reference 1e-5",
        "fsdp": "under torchrun: shard the frozen base model over the processes (FSDP2), so each process holds 1/N "
                "of its weights and gathers one block at a time: for a model that does not fit one GPU "
                "(docs/trainer.md, 'A model that does not fit one GPU'). The same result as without",
        "validate_every": "write a 4- and 8-step validation grid every N steps (0: never)",
        "validation_prompts": "validation prompt (repeat the flag for several; default: first dataset captions)",
        "calibrate": "after the last step, measure the sampler settings (steps, eta, guidance) that suit the new "
                     "LoRA and write them into its metadata (--no-calibrate: the family's defaults)",
        "calibrate_budget": "calibration costs at most this fraction of the training run's model evaluations "
                            f"(default {DEFAULT_BUDGET}): a short run calibrates with fewer prompts, only the "
                            "recommended step count, then a coarser grid; at least 4 prompts (docs/trainer.md)",
        "calibrate_prompts": "calibrate with this many prompts (the data's captions, fresh noises) and the full sweep, "
                             "whatever the budget (default: the budget rule's, at most 32)",
        "calibrate_steps": "calibrate these step counts (e.g. 2 4 6 8) with the full sweep, whatever the budget",
        "calibrate_criterion": "distance to the teacher's 25-step image that calibration minimises (see "
                               "docs/trainer.md)",
    }
    for f in settings():
        name, flag, h = f.name, _flag(f.name), helps.get(f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=h)
        elif name == "validation_prompts":
            p.add_argument(flag, "--validation-prompt", dest=name, action="append", help=h)
        elif name == "clip":
            p.add_argument(flag, dest=name, action="append", help=h)
        elif name == "calibrate_steps":
            p.add_argument(flag, dest=name, type=int, nargs="+", metavar="STEPS", help=h)
        elif name == "flux_guidance_range":
            p.add_argument(flag, dest=name, type=float, nargs=2, metavar=("LO", "HI"), help=h)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            choices = {"method": METHODS, "loss": LOSSES, "lr_schedule": SCHEDULES, "precision": PRECISIONS,
                       "base_dtype": BASE_DTYPES, "calibrate_criterion": tuple(CRITERIA)}.get(name)
            p.add_argument(flag, dest=name, type=kind, choices=choices, help=h)
    return p


def load_toml(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in settings()}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown setting {key!r} in {path}; see distill.py --help for the names")
        out[name] = value
    return out


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict:
    """The settings of ``trainer/presets/<name>.toml`` (the reference's hyper-parameters for a family)."""
    path = PRESETS_DIR / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())} "
                          f"(files in {PRESETS_DIR}), or drop --preset")
    values = load_toml(path)
    values.pop("preset", None)
    return values


def merge_settings(preset: dict, toml: dict, flags: dict) -> dict:
    """defaults < preset < TOML file < flags; an explicit grad_accum overrides a preset's accumulate_to."""
    values = {**preset, **toml, **flags}
    if ("grad_accum" in toml or "grad_accum" in flags) and "accumulate_to" not in toml and "accumulate_to" not in flags:
        values.pop("accumulate_to", None)
    return values


def parse_args(argv=None) -> TrainConfig:
    ns = vars(build_parser().parse_args(argv))
    toml = load_toml(ns.pop("config")) if "config" in ns else {}
    name = ns.get("preset", toml.get("preset"))
    preset = load_preset(name) if name else {}
    return TrainConfig(**merge_settings(preset, toml, ns)).validate()
