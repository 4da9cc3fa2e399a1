"""Calibration: the sampler settings that suit one TDD LoRA, measured on its own model.

A distilled student's best guidance, eta and step count depend on the model it was distilled from
(on the demo model the reference's SDXL guidance 1.7 shifts colours; 1.0-1.5 suits it better). So
after training - or later, for any LoRA file, with ``python -m trainer.calibrate`` - the sweep below
samples the student with the TDD sampler, in the family's own space, for a held-out set of prompts
and noises, and scores each setting without any classifier:

* the **reference** is the teacher's own many-step image (LoRA off, 25 deterministic steps at the
  teacher's training guidance) from the same prompt and the same initial noise;
* a **criterion** (:data:`CRITERIA`) measures how far the student's image lies from it. Which one is
  used by default was chosen by measurement on the demo model, where an attribute classifier gives
  the ground truth (``bench/calibration_criteria.py``; the figures are in docs/quality.md).

The sweep is a coordinate search per step count: guidance first (at the family's eta), then eta at
the chosen guidance; ``search="grid"`` scores every pair. Every draw is seeded: prompt ``i``'s noise
comes from its own generator (seed, i), so the result does not depend on the batch size.

Its cost is counted in model evaluations (one image through the diffusion model once), and at the
end of a training run it is held to a fraction of the run's own (:func:`plan_for_run`, the budget
rule): a short run gets fewer prompts, only its recommended step count, then a coarser grid. The
sweep reports its progress and stops at the next model evaluation when asked to
(:class:`Monitor`, :class:`CalibrationStopped`).

The result (:class:`Calibration`) goes into the LoRA's ``tdd_recommended_*`` metadata and a
``tdd_calibration`` JSON table, which TDD LoRA Loader reads back.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from tdd_core import batch_stable_noise_sampler, item_seed, sample_tdd, tdd_timesteps

from .data import same_length
from .lora_format import atomic_save_safetensors, read_tdd_metadata, recommended_settings

log = logging.getLogger(__name__)

#: The teacher's reference: this many deterministic (DDIM = Euler in the sampling space) steps.
REFERENCE_STEPS = 25
#: A saturated pixel: any channel at most 2/255 from black or white (the bench's definition).
SATURATED = 2.0 / 255.0


# ------------------------------------------------------------------------------------------------
# criteria: per-prompt distances of the student's sample to the teacher's reference (lower is better)
# ------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """Sampled latents (x0 space) and, decoded on first use, their images [B, H, W, 3] in [0, 1]."""
    latents: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pixels(self) -> torch.Tensor:
        if self._pixels is None:
            self._pixels = self.decode(self.latents).float()
        return self._pixels


def _per_item(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).mean(1)


def latent_mse(s: Sample, ref: Sample) -> torch.Tensor:
    """Mean squared distance in the model's latent (x0) space."""
    return _per_item((s.latents.float() - ref.latents.float()) ** 2)


def pixel_mse(s: Sample, ref: Sample) -> torch.Tensor:
    """Mean squared distance of the decoded images (values in [0, 1])."""
    return _per_item((s.pixels - ref.pixels) ** 2)


def _lowpass(images: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, 3] (or clips [B, T, H, W, 3]) averaged over blocks of 1/16 of their shorter side:
    colour and layout, no texture. -> [B, ...] (each frame of a clip pooled alike)."""
    x = images.reshape(-1, *images.shape[-3:]).movedim(-1, 1)
    k = max(1, min(x.shape[-2:]) // 16)
    return F.avg_pool2d(x, k).reshape(images.shape[0], -1)


def lowpass_mse(s: Sample, ref: Sample) -> torch.Tensor:
    """Mean squared distance of the decoded images after a 16x16-block average: compares colour and
    layout, not the fine texture a few-step sampler draws differently from the same noise."""
    return _per_item((_lowpass(s.pixels) - _lowpass(ref.pixels)) ** 2)


def saturated_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per image: the fraction of pixels with a channel within 2/255 of black or white."""
    sat = ((images <= SATURATED) | (images >= 1.0 - SATURATED)).any(dim=-1)
    return sat.flatten(1).float().mean(1)


def excess_saturation(s: Sample, ref: Sample) -> torch.Tensor:
    """Saturated (clipped) pixels beyond the teacher's own, as a fraction of the image."""
    return (saturated_fraction(s.pixels) - saturated_fraction(ref.pixels)).clamp_min(0.0)


def pixel_mse_saturation(s: Sample, ref: Sample) -> torch.Tensor:
    """:func:`pixel_mse` plus a penalty for over-exposure: each excess saturated pixel counts as an
    error of half the value range (0.5**2), on top of its own distance."""
    return pixel_mse(s, ref) + 0.25 * excess_saturation(s, ref)


#: The candidate criteria, by name (``--criterion``).
CRITERIA: dict[str, Callable[[Sample, Sample], torch.Tensor]] = {
    "latent": latent_mse,
    "pixel": pixel_mse,
    "lowpass": lowpass_mse,
    "pixel+saturation": pixel_mse_saturation,
}
#: The default: the candidate whose choices agreed best with the demo classifier (docs/quality.md).
DEFAULT_CRITERION = "latent"


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One sampler setting: TDD Scheduler steps, TDD Guidance scale (FLUX: its guidance), TDD Sampler eta."""
    steps: int
    guidance: float
    eta: float

    def key(self) -> tuple:
        return self.steps, round(self.guidance, 4), round(self.eta, 4)


@dataclass(frozen=True)
class Sweep:
    """What is swept. ``guidances`` means CFG against the empty prompt for SD-family students and the
    guidance embedding for FLUX (:meth:`for_family`)."""
    steps: tuple[int, ...] = (2, 4, 6, 8)
    guidances: tuple[float, ...] = (1.0, 1.3, 1.5, 1.7, 2.0, 2.5)
    etas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    search: str = "coordinate"          # or "grid"

    @staticmethod
    def for_family(arch: str, method: str = "tdd", steps: tuple[int, ...] | None = None) -> "Sweep":
        """FLUX sweeps its guidance embedding; an LCM student keeps LCM's eta 1 (its sampler)."""
        base = Sweep(guidances=(1.5, 2.0, 2.5, 3.0, 3.5)) if arch == "flux" else Sweep()
        etas = (1.0,) if method == "lcm" else base.etas
        return Sweep(tuple(steps) if steps else base.steps, base.guidances, etas, base.search)

    def coarse(self, arch: str) -> "Sweep":
        """The budget rule's last level: fewer guidances (around the values calibration chose on the
        demo model and the method's recipe: CFG 1.0-2.0; FLUX's embedding 1.5-2.5) and eta 0 or 0.2."""
        guidances = (1.5, 2.0, 2.5) if arch == "flux" else (1.0, 1.3, 1.7, 2.0)
        etas = tuple(e for e in self.etas if e in (0.0, 0.2)) or self.etas
        return Sweep(self.steps, guidances, etas, self.search)

    def only(self, steps: int) -> "Sweep":
        return Sweep((int(steps),), self.guidances, self.etas, self.search)

    def describe(self) -> str:
        return (f"{'/'.join(map(str, self.steps))} steps x guidance {'/'.join(f'{g:g}' for g in self.guidances)} "
                f"x eta {'/'.join(f'{e:g}' for e in self.etas)} ({self.search})")


# ------------------------------------------------------------------------------------------------
# the cost and the budget rule
# ------------------------------------------------------------------------------------------------

#: By default calibration costs at most this fraction of the training run, in model evaluations.
DEFAULT_BUDGET = 0.10
#: A training sample's cost in model evaluations: the student's forward and backward (about two
#: forwards), the teacher's conditional and unconditional predictions, the target's prediction.
TRAIN_EVALS_PER_SAMPLE = 6
#: Prompts of the full calibration (the most the budget rule gives).
FULL_PROMPTS = 32
#: The fewest prompts a level of the budget rule is used with before the next, cheaper level.
MIN_PROMPTS = 8
#: The floor: the coarse level with this many prompts runs whatever the budget (a usable answer).
FLOOR_PROMPTS = 4


def guidance_family(teacher) -> str:
    """The family as calibration sees it: ``"flux"`` for a guidance-embedded one (FLUX.1-dev, FLUX.2,
    HunyuanVideo: FLUX's sweep of the embedding, one pass per step, FLUX's recommended steps), else its
    arch (CFG against the empty prompt)."""
    return "flux" if getattr(teacher, "embedded_guidance", teacher.arch == "flux") else teacher.arch


def guidance_passes(arch: str, guidance: float) -> int:
    """Model evaluations per image and sampler step at ``guidance``: CFG against the empty prompt
    evaluates twice (``guidance`` 1: once); FLUX's guidance embedding once."""
    return 1 if arch == "flux" or float(guidance) == 1.0 else 2


def evaluations_per_prompt(sweep: Sweep, arch: str, eta0: float, reference_guidance: float) -> int:
    """The most model evaluations one prompt costs: the reference, then every setting :func:`search`
    may score (the eta pass counted at the most expensive guidance, since which one wins is unknown)."""
    passes = [guidance_passes(arch, g) for g in sweep.guidances]
    if sweep.search == "grid":
        per_step = len(sweep.etas) * sum(passes)
    else:
        per_step = sum(passes) + len([e for e in sweep.etas if e != eta0]) * max(passes)
    return REFERENCE_STEPS * guidance_passes(arch, reference_guidance) + per_step * sum(sweep.steps)


@dataclass(frozen=True)
class Plan:
    """What a calibration will do and why: its prompts and sweep, its cost in model evaluations (an
    upper bound), and the budget it was fitted to (``budget`` None: the user asked for it explicitly,
    or no training run to measure against)."""
    prompts: int
    sweep: Sweep
    level: str                      # "full", "recommended steps", "coarse", "floor", "explicit"
    evaluations: int
    reason: str
    budget: int | None = None
    training_evaluations: int | None = None
    fraction: float | None = None

    def describe(self) -> str:
        return f"{self.prompts} prompts x ({self.sweep.describe()}) = {self.evaluations:,} model evaluations"

    def metadata(self) -> dict:
        return {"level": self.level, "reason": self.reason, "planned_evaluations": self.evaluations,
                "steps": list(self.sweep.steps), "guidances": list(self.sweep.guidances),
                "etas": list(self.sweep.etas), "budget_fraction": self.fraction, "budget_evaluations": self.budget,
                "training_evaluations": self.training_evaluations}


def _recommended(arch: str, method: str, kmin: int, kmax: int) -> tuple[int, float]:
    rec = recommended_settings(method, kmin, kmax, arch)
    return int(rec["tdd_recommended_steps"]), float(rec["tdd_recommended_eta"])


def _with_steps(sweep: Sweep, steps: int) -> Sweep:
    """The sweep as :func:`calibrate` runs it: the recommended step count is always among its steps."""
    return sweep if steps in sweep.steps else Sweep(tuple(sorted({*sweep.steps, steps})), sweep.guidances,
                                                     sweep.etas, sweep.search)


def plan_for_run(arch: str, method: str, kmin: int, kmax: int, training_samples: int, reference_guidance: float, *,
                 fraction: float = DEFAULT_BUDGET, prompts: int | None = None, steps: tuple[int, ...] | None = None,
                 search: str = "coordinate") -> Plan:
    """The budget rule. The run's training costs ``training_samples x`` :data:`TRAIN_EVALS_PER_SAMPLE`
    model evaluations; calibration may cost ``fraction`` of that. The first of these levels that fits
    with at least :data:`MIN_PROMPTS` prompts is used, with as many prompts as fit (at most
    :data:`FULL_PROMPTS`):

    1. **full**: the family's sweep (2, 4, 6, 8 steps);
    2. **recommended steps**: only the method's recommended step count (4; FLUX 8);
    3. **coarse**: that step count with :meth:`Sweep.coarse`'s guidances and etas.

    When even the coarse level fits fewer than :data:`MIN_PROMPTS` prompts it runs with as many as
    fit, never fewer than :data:`FLOOR_PROMPTS` (the **floor**: a very short run's calibration costs
    more than its fraction, at most the floor's evaluations). ``prompts`` or ``steps`` given (the
    user's ``--calibrate-prompts`` / ``--calibrate-steps``) switch the rule off: the full sweep at
    those prompts (default :data:`FULL_PROMPTS`) and step counts."""
    rec_steps, rec_eta = _recommended(arch, method, kmin, kmax)
    family = Sweep.for_family(arch, method, steps)
    family = _with_steps(Sweep(family.steps, family.guidances, family.etas, search), rec_steps)
    eta0 = min(family.etas, key=lambda e: abs(e - rec_eta))

    def cost(sweep: Sweep) -> int:
        return evaluations_per_prompt(sweep, arch, eta0, reference_guidance)

    if prompts is not None or steps is not None:
        n = int(prompts or FULL_PROMPTS)
        return Plan(n, family, "explicit", n * cost(family),
                    "asked for explicitly (a number of prompts or step counts given): no budget")
    train_evals = int(training_samples) * TRAIN_EVALS_PER_SAMPLE
    budget = int(fraction * train_evals)
    fitted = dict(budget=budget, training_evaluations=train_evals, fraction=fraction)
    levels = [("full", family), ("recommended steps", family.only(rec_steps)),
              ("coarse", family.only(rec_steps).coarse(arch))]
    for level, sweep in levels:
        n = min(FULL_PROMPTS, budget // cost(sweep))
        if n >= MIN_PROMPTS:
            why = (f"fits {fraction:.0%} of the training run ({train_evals:,} evaluations: budget {budget:,})"
                   + ("" if level == "full" else f"; the levels before it fit fewer than {MIN_PROMPTS} prompts"))
            return Plan(n, sweep, level, n * cost(sweep), why, **fitted)
    level, sweep = levels[-1]
    n = max(FLOOR_PROMPTS, budget // cost(sweep))
    over = n * cost(sweep) > budget
    why = (f"the coarse level fits {budget // cost(sweep)} prompts in {fraction:.0%} of the training run "
           f"({train_evals:,} evaluations: budget {budget:,}); "
           + (f"the floor of {FLOOR_PROMPTS} prompts runs anyway, over the budget" if over
              else f"fewer than {MIN_PROMPTS} prompts"))
    return Plan(n, sweep, "floor" if over else level, n * cost(sweep), why, **fitted)


@dataclass
class Calibration:
    """The outcome: the chosen setting per step count, the recommended one, and every score."""
    criterion: str
    prompts: int
    seed: int
    recommended: Setting
    best: dict[int, Setting]
    scores: dict[tuple, float]          # Setting.key() -> mean criterion value
    seconds: float
    reference: str
    run_seconds: float | None = None    # the training run's own time, when calibrated at its end
    evaluations: int = 0                # model evaluations done (each image through the model once)
    plan: Plan | None = None            # what was planned and why (the budget rule)

    @property
    def fraction_of_run(self) -> float | None:
        return None if not self.run_seconds else self.seconds / self.run_seconds

    def metadata(self) -> dict[str, str]:
        """The LoRA file's header entries: the recommended values and the ``tdd_calibration`` table."""
        table = {
            "criterion": self.criterion, "prompts": self.prompts, "seed": self.seed, "reference": self.reference,
            "seconds": round(self.seconds, 1), "evaluations": self.evaluations,
            **({"fraction_of_run": round(self.fraction_of_run, 4)} if self.fraction_of_run is not None else {}),
            **({"plan": self.plan.metadata()} if self.plan is not None else {}),
            "best": {str(k): {"guidance": s.guidance, "eta": s.eta} for k, s in sorted(self.best.items())},
            "scores": [[k[0], k[1], k[2], round(v, 6)] for k, v in sorted(self.scores.items())],
        }
        return {"tdd_recommended_steps": str(self.recommended.steps),
                "tdd_recommended_eta": str(self.recommended.eta),
                "tdd_recommended_guidance": str(self.recommended.guidance),
                "tdd_calibration": json.dumps(table, separators=(",", ":"))}

    def summary(self) -> str:
        r = self.recommended
        others = ", ".join(f"{k}: guidance {s.guidance:g} eta {s.eta:g}" for k, s in sorted(self.best.items())
                           if k != r.steps)
        return (f"calibrated on {self.prompts} prompts ({self.criterion} distance to the teacher's "
                f"{self.reference}): {r.steps} steps, guidance {r.guidance:g}, eta {r.eta:g}"
                + (f" ({others})" if others else ""))


class CalibrationStopped(Exception):
    """A stop request (SIGTERM, Ctrl-C, a host's Cancel) honoured during calibration."""


class Monitor:
    """Counts calibration's model evaluations, reports them (``progress(done, total)``) and raises
    :class:`CalibrationStopped` before the next evaluation once ``stop()`` says so: one model call is
    the longest a stop request waits."""

    def __init__(self, total: int = 0, progress: Callable[[int, int], None] | None = None,
                 stop: Callable[[], bool] | None = None):
        self.total, self.done = int(total), 0
        self._progress, self._stop = progress, stop

    def before(self) -> None:
        if self._stop is not None and self._stop():
            raise CalibrationStopped(f"stopped after {self.done:,} of {self.total:,} model evaluations")

    def count(self, n: int) -> None:
        self.done += int(n)
        if self._progress is not None:
            self._progress(self.done, max(self.total, self.done))


class Calibrator:
    """Samples the student and the teacher for a fixed set of prompts and noises.

    ``teacher``: a :class:`trainer.models.Teacher` (the model seam). ``lora(on)``: a context manager
    factory that switches the LoRA on or off (the trainer's hooks, or a file patched in by the host).
    """

    def __init__(self, teacher, lora: Callable[[bool], ContextManager], captions: list[str], resolution: int,
                 seed: int = 0, batch: int = 16, reference_guidance: float | None = None,
                 monitor: Monitor | None = None, frames: int = 1):
        self.teacher, self.lora, self.seed, self.batch = teacher, lora, int(seed), max(1, int(batch))
        self.monitor = monitor or Monitor()
        self.n = len(captions)
        ctx, pooled = teacher.encode_text(captions)
        ectx, epooled = teacher.encode_text([""])
        # one length for the prompts and the empty prompt, which CFG batches (LLM encoders' lengths vary)
        ctx, ectx = same_length(ctx, ectx)
        res = int(resolution)
        self.conds = [teacher.make_cond(ctx[i:i + 1], None if pooled is None else pooled[i:i + 1], res, res)
                      for i in range(self.n)]
        self.empty = teacher.make_cond(ectx, epooled, res, res)
        # a video family is calibrated on clips of the trained length (5-D latents), as it will be sampled
        self.shape = teacher.latent_shape(res) if frames == 1 else teacher.latent_shape(res, int(frames))
        self.reference_guidance = (teacher.default_reference_guidance() if reference_guidance is None
                                   else float(reference_guidance))
        self._ref: Sample | None = None

    def _noise(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(item_seed(self.seed, index))
        return torch.randn(self.shape, generator=g)

    @torch.no_grad()
    def run(self, timesteps: list[int], guidance: float, eta: float, lora_on: bool = True,
            x0_clip_steps: int = 0) -> Sample:
        """Every prompt sampled with the TDD sampler over ``timesteps`` (then 0), the LoRA on or off;
        ``x0_clip_steps`` clamps the x0 prediction of that many first steps (TDD Sampler's option)."""
        t = self.teacher
        sigmas = torch.cat([t.sigmas[timesteps], t.sigmas.new_zeros(1)]).to(t.device)
        out = []
        with self.lora(lora_on):
            for start in range(0, self.n, self.batch):
                idx = range(start, min(start + self.batch, self.n))
                noise = torch.stack([self._noise(i) for i in idx]).to(t.device)
                cond = _cat([self.conds[i] for i in idx])
                x = t.start_latent(noise, sigmas[0])
                # per-item step noise: item i's draws do not depend on the chunking
                sampler = batch_stable_noise_sampler(x, self.seed + 1, first_index=start)
                out.append(sample_tdd(self._counted(t.guided_denoiser(cond, self.empty, guidance), guidance), x,
                                      sigmas, eta=eta,
                                      disable=True, noise_sampler=sampler, space=t.space(),
                                      x0_clip_steps=x0_clip_steps).float().cpu())
        return Sample(torch.cat(out), self.teacher.decode)

    def _counted(self, model, guidance: float):
        """``model`` with every call checked for a stop request first and counted after."""
        passes = guidance_passes(guidance_family(self.teacher), guidance)

        def counted(x, sigma, **kwargs):
            self.monitor.before()
            out = model(x, sigma, **kwargs)
            self.monitor.count(x.shape[0] * passes)
            return out
        return counted

    def reference(self) -> Sample:
        """The teacher's image per prompt: LoRA off, :data:`REFERENCE_STEPS` deterministic steps."""
        if self._ref is None:
            steps = torch.linspace(len(self.teacher.sigmas) - 1, 0, REFERENCE_STEPS).round().long().tolist()
            self._ref = self.run(steps, self.reference_guidance, 0.0, lora_on=False)
        return self._ref

    def sample(self, s: Setting) -> Sample:
        """The student's images with the TDD sampler at setting ``s`` (the TDD Scheduler's timesteps)."""
        return self.run(tdd_timesteps(s.steps), s.guidance, s.eta)

    def describe_reference(self) -> str:
        return f"{REFERENCE_STEPS}-step image at guidance {self.reference_guidance:g}"


def _cat(conds: list):
    return functools.reduce(lambda a, b: a.cat(b), conds)


def search(score: Callable[[Setting], float], sweep: Sweep, eta0: float) -> tuple[dict[int, Setting], dict]:
    """-> (the best setting per step count, every score). Coordinate search: guidance at ``eta0``, then
    eta at that guidance; ``sweep.search == "grid"`` scores every (guidance, eta). Ties keep the first."""
    scores: dict[tuple, float] = {}

    def value(s: Setting) -> float:
        if s.key() not in scores:
            scores[s.key()] = float(score(s))
        return scores[s.key()]

    best = {}
    for k in sweep.steps:
        if sweep.search == "grid":
            cands = [Setting(k, g, e) for g in sweep.guidances for e in sweep.etas]
            best[k] = min(cands, key=value)
            continue
        g_best = min((Setting(k, g, eta0) for g in sweep.guidances), key=value).guidance
        best[k] = min((Setting(k, g_best, e) for e in sweep.etas), key=value)
    return best, scores


def calibrate(calibrator: Calibrator, sweep: Sweep, criterion: str, recommended_steps: int,
              default_eta: float, plan: Plan | None = None) -> Calibration:
    """Run the sweep and choose: the setting with the lowest mean ``criterion`` per step count; the
    recommended setting is the best one at ``recommended_steps`` (the method's step count)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown calibration criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    sweep = _with_steps(sweep, recommended_steps)
    start = time.perf_counter()
    ref = calibrator.reference()
    fn = CRITERIA[criterion]
    eta0 = min(sweep.etas, key=lambda e: abs(e - default_eta))
    best, scores = search(lambda s: fn(calibrator.sample(s), ref).mean(), sweep, eta0)
    cal = Calibration(criterion, calibrator.n, calibrator.seed, best[recommended_steps], best, scores,
                      time.perf_counter() - start, calibrator.describe_reference(),
                      evaluations=calibrator.monitor.done, plan=plan)
    log.info("%s in %.0f s (%d settings, %s model evaluations)", cal.summary(), cal.seconds, len(scores),
             f"{cal.evaluations:,}")
    return cal


def calibrate_lora(teacher, lora: Callable[[bool], ContextManager], captions: list[str], resolution: int, *,
                   method: str = "tdd", kmin: int = 4, kmax: int = 8, seed: int = 0,
                   criterion: str = DEFAULT_CRITERION, reference_guidance: float | None = None,
                   steps: tuple[int, ...] | None = None, search: str = "coordinate", batch: int = 16,
                   plan: Plan | None = None, monitor: Monitor | None = None, frames: int = 1) -> Calibration:
    """Calibrate one LoRA on ``teacher`` (the trainer at the end of a run, the CLI, the quality bench):
    the family's sweep (``steps`` overrides its step counts) around the method's own settings, whose
    step count becomes the recommended one; or ``plan``'s sweep (:func:`plan_for_run`). ``frames``: the
    clip length a video family samples (its latents are 5-D)."""
    rec_steps, rec_eta = _recommended(guidance_family(teacher), method, kmin, kmax)
    if plan is not None:
        sweep = plan.sweep
    else:
        family = Sweep.for_family(guidance_family(teacher), method, steps)
        sweep = Sweep(family.steps, family.guidances, family.etas, search)
    calibrator = Calibrator(teacher, lora, captions, resolution, seed=seed, batch=batch,
                            reference_guidance=reference_guidance, monitor=monitor, frames=frames)
    return calibrate(calibrator, sweep, criterion, rec_steps, rec_eta, plan)


def held_out_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """``n`` captions of the data, a seeded draw (with repeats only when the data has fewer); each one is
    sampled from fresh noise, which the run never trained on. Empty captions are skipped when possible."""
    pool = [c for c in captions if c.strip()] or list(captions) or [""]
    g = torch.Generator().manual_seed(int(seed) + 7919)
    order = torch.randperm(len(pool), generator=g).tolist()
    return [pool[order[i % len(pool)]] for i in range(int(n))]


# ------------------------------------------------------------------------------------------------
# the CLI: recalibrate an existing LoRA file (written to a copy)
# ------------------------------------------------------------------------------------------------

def recalibrated_copy(lora_path: Path, out: Path, calibration: Calibration) -> Path:
    """Write ``out``: the tensors of ``lora_path`` with its metadata plus the calibration (the
    original is never changed)."""
    from safetensors import safe_open

    with safe_open(str(lora_path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(calibration.metadata())
    atomic_save_safetensors(tensors, out, meta)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.calibrate",
        description="Measure the sampler settings (steps, eta, guidance) that suit a TDD LoRA on its base model "
                    "and write them into a copy of the file.")
    p.add_argument("--teacher", required=True,
                   help="the base model the LoRA was made for: a checkpoint, or a factory 'module:function'")
    p.add_argument("--lora", required=True, help="the LoRA file (this trainer's, or a released TDD LoRA)")
    p.add_argument("--out", help="where to write the calibrated copy (default: <lora>_calibrated.safetensors)")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (the budget; default 32)")
    p.add_argument("--captions", help="a text file of prompts, one per line (default: generic prompts)")
    p.add_argument("--resolution", type=int, help="image size (default: the family's native size)")
    p.add_argument("--steps", type=int, nargs="+", help="step counts to calibrate (default 4 6 8)")
    p.add_argument("--frames", type=int,
                   help="clip length for a video family (default: the length the LoRA was trained on, else 1)")
    p.add_argument("--criterion", choices=sorted(CRITERIA), default=DEFAULT_CRITERION)
    p.add_argument("--search", choices=("coordinate", "grid"), default="coordinate")
    p.add_argument("--reference-guidance", type=float,
                   help="the teacher's guidance for its reference images (default: CFG 4.5; FLUX: 3.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="prompts sampled together")
    p.add_argument("--device", default="auto")
    return p


#: Prompts for a file calibrated without captions of its own (varied subjects, as users write them).
GENERIC_PROMPTS = (
    "a photo of a red apple on a wooden table", "portrait of an old man with a beard, studio light",
    "a mountain lake at sunrise, mist", "a blue sports car on a city street at night",
    "a bowl of ramen, close-up", "a cat sleeping on a windowsill", "an oil painting of a lighthouse in a storm",
    "a futuristic city skyline, neon lights", "a bouquet of yellow tulips in a glass vase",
    "a knight in silver armour, fantasy illustration", "a cozy living room with a fireplace",
    "a macro photo of a dragonfly", "a desert with sand dunes under a starry sky", "a green parrot on a branch",
    "a watercolour of a small village by the sea", "a chocolate cake with strawberries",
)


@contextlib.contextmanager
def progress_bar(total: int, disable: bool = False, also: Callable[[int, int], None] | None = None):
    """A tqdm bar in model evaluations -> its ``progress(done, total)`` callback (for :class:`Monitor`),
    which calls ``also(done, total)`` too (a host's own progress display)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=disable, desc="calibrate", unit="eval", unit_scale=True)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if also is not None:
            also(done, total)
    try:
        yield progress
    finally:
        bar.close()


def main(argv=None) -> int:
    from .models import TeacherError, load_teacher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    lora = Path(args.lora)
    out = Path(args.out) if args.out else lora.with_name(lora.stem + "_calibrated.safetensors")
    problem = (f"--lora {lora}: no such file" if not lora.is_file() else
               f"--out {out} is the LoRA itself: calibration writes a copy; choose another --out"
               if out.resolve() == lora.resolve() else
               f"--prompts must be >= 1, got {args.prompts}" if args.prompts < 1 else
               f"--frames must be >= 1, got {args.frames}" if args.frames is not None and args.frames < 1 else None)
    if problem:
        log.error("%s", problem)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        teacher = load_teacher(args.teacher, dtype=torch.float32, device=device).to(device)
    except TeacherError as e:
        log.error("%s", e)
        return 2
    meta = read_tdd_metadata(lora)
    method = str(meta.get("tdd_method", "tdd")).split("-")[0]
    method = method if method in ("tdd", "tcd", "lcm") else "tdd"
    kmin, kmax = int(meta.get("tdd_kmin", 4)), int(meta.get("tdd_kmax", 8))
    captions = (Path(args.captions).read_text(encoding="utf-8").splitlines() if args.captions
                else list(GENERIC_PROMPTS))
    reference_guidance = (teacher.default_reference_guidance() if args.reference_guidance is None
                          else args.reference_guidance)
    plan = plan_for_run(guidance_family(teacher), method, kmin, kmax, 0, reference_guidance, prompts=args.prompts,
                        steps=tuple(args.steps) if args.steps else None, search=args.search)
    log.info("calibrating: %s", plan.describe())
    with progress_bar(plan.evaluations) as progress:
        result = calibrate_lora(
            teacher, lambda on: teacher.lora_file_applied(lora) if on else contextlib.nullcontext(),
            held_out_captions([c for c in captions if c.strip()], plan.prompts, args.seed),
            args.resolution or int(meta.get("tdd_resolution", 0) or 0) or teacher.native_resolution,
            method=method, kmin=kmin, kmax=kmax, seed=args.seed, criterion=args.criterion,
            reference_guidance=reference_guidance, batch=args.batch, plan=plan,
            monitor=Monitor(plan.evaluations, progress),
            frames=args.frames or int(meta.get("tdd_frames", 1) or 1))
    recalibrated_copy(lora, out, result)
    log.info("wrote %s (the original %s is unchanged)", out, lora)
    return 0


if __name__ == "__main__":
    sys.exit(main())
