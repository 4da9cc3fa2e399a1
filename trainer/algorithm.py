"""The distillation objective of docs/method.md §5, in plain torch (no ComfyUI).

A *schedule* supplies what differs between teacher families: its noise levels (``noised``), the
deterministic move of a state to a lower level given x0 (``move_to``), the teacher's solver step
(``teacher_step``) and any per-sample conditioning (``condition``). :class:`DiscreteSchedule` is the
discrete DDPM (variance preserving) one of SD1.5/SD2.x/SDXL: ``z_t = a_t x0 + s_t eps`` with
``a_t = sqrt(abar[t])``, ``s_t = sqrt(1 - abar[t])``, ``abar`` from the host's
``model_sampling.sigmas`` (``abar = 1 / (1 + sigma^2)``); :class:`trainer.flow.FlowSchedule` is the
flow-matching one of FLUX.1 (docs/method.md §5.1). The networks are reached through ``x0``-predicting callables
(:class:`trainer.models.Teacher` converts from the host's spaces and parameterisations), so
:func:`compute_loss` is the same for every family.

Per-sample randomness comes from one ``torch.Generator`` per *global* sample index (see
:func:`sample_generator`), so a batch split across processes or micro-batches draws exactly the
same numbers as the whole batch in one process.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from tdd_core import solver_grid, target_set

LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0
SOLVER_STEP = 4  # k = 1000 / 250: t' = t - k


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------
class DiscreteSchedule:
    """``a_t``, ``s_t`` of the teacher's 1000-step DDPM schedule, from its sigma table."""

    def __init__(self, sigmas: torch.Tensor):
        sigmas = sigmas.detach().double().cpu()
        self.sigmas = sigmas
        self.abar = 1.0 / (1.0 + sigmas ** 2)
        self.sqrt_abar = self.abar.sqrt().float()
        self.sqrt_one_minus_abar = (1.0 - self.abar).sqrt().float()

    def coeffs(self, t: torch.Tensor, like: torch.Tensor):
        """``(a_t, s_t)`` for integer timesteps ``t`` [B], shaped to broadcast against ``like``."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        idx = t.long().cpu()
        a = self.sqrt_abar[idx].to(like.device, like.dtype).view(shape)
        s = self.sqrt_one_minus_abar[idx].to(like.device, like.dtype).view(shape)
        return a, s

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Spec 5.3: ``z_t = a_t x0 + s_t eps``."""
        a_t, s_t = self.coeffs(t, x0)
        return a_t * x0 + s_t * noise

    def move_to(self, z, x0, t, target):
        return move_to(z, x0, t, target, self)

    def condition(self, cond: "Cond", draws: "SampleDraws") -> "Cond":
        return cond

    def teacher_step(self, teacher, z, t, t_prev, cond: "Cond", uncond: "Cond", w: float):
        """Spec 5.5: the LoRA-off teacher, cond and uncond in one batched pass, one guided DDIM step t -> t'."""
        x0_c, x0_u = teacher(torch.cat([z, z]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
        return teacher_ddim_step(z, x0_c, x0_u, t, t_prev, w, self)


# ---------------------------------------------------------------------------------------------
# per-sample draws
# ---------------------------------------------------------------------------------------------
def sample_generator(seed: int, global_index: int, stream: str = "tdd-trainer") -> torch.Generator:
    """A generator for one training sample: a function of (seed, global sample counter) only.
    ``stream`` names an independent sequence for the same sample (adversarial draws, VAE posterior)."""
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(global_index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class TimestepDraw:
    t: int        # source timestep (on the solver grid)
    t_prev: int   # t' = max(t - 4, 0): one teacher solver step below t
    s: int        # target timestep, s <= t'
    tau: int      # the target before the stochastic shrink


class TargetSampler:
    """Source/target timestep draws for ``tdd`` (docs/method.md §5, steps 1-2), ``tcd`` and ``lcm``.

    - tdd: ``m*`` = largest target-set value <= t'; ``tau`` uniform over target-set values in
      ``[max(m* - 260, 0), m*]``; ``s = floor((1 - u * eta_max) * tau)``.
    - tcd: ``tau`` uniform over all integers in ``[0, t']``, then the same shrink (gamma = u * eta_max).
    - lcm: always ``s = 0`` (x0); consistency boundary conditions are applied by :func:`compute_loss`.
    """

    WINDOW = 260

    def __init__(self, method: str = "tdd", kmin: int = 4, kmax: int = 8, eta_max: float = 0.3):
        if method not in ("tdd", "tcd", "lcm"):
            raise ValueError(f"unknown method {method!r}")
        self.method, self.eta_max = method, float(eta_max)
        self.grid = solver_grid()
        self.targets = torch.tensor(target_set(kmin, kmax), dtype=torch.long)

    def window(self, t_prev: int) -> torch.Tensor:
        m_star = int(self.targets[self.targets <= t_prev].max())
        lo = max(m_star - self.WINDOW, 0)
        return self.targets[(self.targets >= lo) & (self.targets <= m_star)]

    def draw(self, gen: torch.Generator) -> TimestepDraw:
        n = int(torch.randint(0, len(self.grid), (1,), generator=gen))
        t = int(self.grid[n])
        t_prev = max(t - SOLVER_STEP, 0)
        if self.method == "lcm":
            return TimestepDraw(t, t_prev, 0, 0)
        if self.method == "tdd":
            cands = self.window(t_prev)
            tau = int(cands[int(torch.randint(0, len(cands), (1,), generator=gen))])
        else:
            tau = int(torch.randint(0, t_prev + 1, (1,), generator=gen))
        u = float(torch.rand((1,), generator=gen, dtype=torch.float64))
        s = int(math.floor((1.0 - u * self.eta_max) * tau))
        return TimestepDraw(t, t_prev, s, tau)


@dataclass
class SampleDraws:
    t: torch.Tensor
    t_prev: torch.Tensor
    s: torch.Tensor
    empty: torch.Tensor   # bool [B]: caption replaced by the empty prompt
    noise: torch.Tensor   # [B, C, H, W]
    u_guidance: torch.Tensor | None = None  # [B] U(0, 1): a per-sample guidance draw (FLUX's guidance range)


def draw_batch(sampler: TargetSampler, seed: int, global_indices, latent_shape, empty_prompt_prob: float) -> SampleDraws:
    """All random choices for the samples at ``global_indices`` (order-independent, process-independent)."""
    ts, tps, ss, empties, noises, us = [], [], [], [], [], []
    for g in global_indices:
        gen = sample_generator(seed, g)
        d = sampler.draw(gen)
        empty = bool(torch.rand((1,), generator=gen, dtype=torch.float64) < empty_prompt_prob)
        noises.append(torch.randn(tuple(latent_shape), generator=gen))
        us.append(float(torch.rand((1,), generator=gen, dtype=torch.float64)))  # last: earlier draws unchanged
        ts.append(d.t), tps.append(d.t_prev), ss.append(d.s), empties.append(empty)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return SampleDraws(as_long(ts), as_long(tps), as_long(ss), torch.tensor(empties), torch.stack(noises),
                       torch.tensor(us, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# conditioning
# ---------------------------------------------------------------------------------------------
@dataclass
class Cond:
    """A batch's model conditioning, as the host's ``extra_conds`` gave it: cross-attention states
    ``context`` [B, L, D]; ``y`` (SDXL's ADM vector, FLUX's pooled CLIP-L vector...); the guidance
    embedding's value per sample [B] for guidance-embedded families; ``extra``: any other model input
    of the family (attention masks, token counts...; tensors batched on dim 0, or per-batch constants)."""

    context: torch.Tensor
    y: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    extra: dict | None = None

    def _map_extra(self, fn, other: "Cond | None" = None) -> dict | None:
        if not self.extra:
            return self.extra
        return {k: fn(v, None if other is None else other.extra[k]) if torch.is_tensor(v) else v
                for k, v in self.extra.items()}

    def cat(self, other: "Cond") -> "Cond":
        y = None if self.y is None else torch.cat([self.y, other.y])
        g = None if self.guidance is None else torch.cat([self.guidance, other.guidance])
        return Cond(torch.cat([self.context, other.context]), y, g,
                    self._map_extra(lambda a, b: torch.cat([a, b]), other))

    def where(self, mask: torch.Tensor, other: "Cond") -> "Cond":
        """Per sample: ``other``'s text where ``mask`` is true, else ``self``'s (guidance stays ``self``'s)."""
        m = mask.to(self.context.device)

        def pick(a, b):
            return torch.where(m.view(-1, *[1] * (a.ndim - 1)), b.expand_as(a), a)
        ctx = pick(self.context, other.context)
        y = None if self.y is None else pick(self.y, other.y)
        return Cond(ctx, y, self.guidance, self._map_extra(pick, other))

    def expand(self, n: int) -> "Cond":
        """A one-sample conditioning repeated to ``n`` samples (views, no copies)."""
        rep = lambda v: None if v is None else v.expand(n, *v.shape[1:])  # noqa: E731
        return Cond(rep(self.context), rep(self.y), rep(self.guidance), self._map_extra(lambda a, _: rep(a)))

    def with_guidance(self, guidance: torch.Tensor) -> "Cond":
        return Cond(self.context, self.y, guidance.to(self.context.device), self.extra)

    def to(self, device) -> "Cond":
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return Cond(self.context.to(device), move(self.y), move(self.guidance), self._map_extra(lambda a, _: a.to(device)))

    def model_kwargs(self) -> dict:
        """The host's ``apply_model`` keyword arguments: ``c_crossattn``, then ``y``/``guidance`` when set,
        then the extras."""
        kwargs = {"c_crossattn": self.context}
        if self.y is not None:
            kwargs["y"] = self.y
        if self.guidance is not None:
            kwargs["guidance"] = self.guidance
        kwargs.update(self.extra or {})
        return kwargs


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------
X0Fn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def eps_from_x0(z, x0, a, s):
    return (z - a * x0) / s


def move_to(z, x0, t, target, sched: DiscreteSchedule):
    """Spec 5.4: from the x0 prediction at ``(z, t)``, the DDIM jump to ``target``: a_s x0 + s_s eps."""
    a_t, s_t = sched.coeffs(t, z)
    a_s, s_s = sched.coeffs(target, z)
    eps = eps_from_x0(z, x0, a_t, s_t)
    return a_s * x0 + s_s * eps


def teacher_ddim_step(z, x0_c, x0_u, t, t_prev, w: float, sched: DiscreteSchedule):
    """Spec 5.5: one DDIM step t -> t' with LCM-convention guidance on both x0 and eps."""
    a_t, s_t = sched.coeffs(t, z)
    a_p, s_p = sched.coeffs(t_prev, z)
    eps_c, eps_u = eps_from_x0(z, x0_c, a_t, s_t), eps_from_x0(z, x0_u, a_t, s_t)
    x0_w = x0_c + w * (x0_c - x0_u)
    eps_w = eps_c + w * (eps_c - eps_u)
    return a_p * x0_w + s_p * eps_w


def lcm_boundary(t: torch.Tensor, like: torch.Tensor):
    """LCM's consistency boundary conditions ``(c_skip, c_out)`` (diffusers' LCM distillation)."""
    scaled = t.double() * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + LCM_SIGMA_DATA ** 2).sqrt()
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (c_skip.to(like.device, like.dtype).view(shape), c_out.to(like.device, like.dtype).view(shape))


def loss_fn(pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", c: float = 0.001) -> torch.Tensor:
    """Spec 5.8: pseudo-Huber ``mean(sqrt(d^2 + c^2) - c)`` over latent elements, or L2 (mean squared)."""
    d = pred.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(d ** 2 + c * c) - c).mean()
    if kind == "l2":
        return (d ** 2).mean()
    raise ValueError(f"unknown loss {kind!r}")


@dataclass
class StepConfig:
    method: str = "tdd"
    teacher_guidance: float = 3.5
    loss: str = "huber"
    huber_c: float = 0.001


def compute_loss(student: X0Fn, teacher: X0Fn, x0: torch.Tensor, cond: Cond, uncond: Cond, draws: SampleDraws,
                 sched, cfg: StepConfig) -> torch.Tensor:
    """One micro-batch of docs/method.md §5: the loss between :func:`prediction_and_target`'s pair."""
    return loss_fn(*prediction_and_target(student, teacher, x0, cond, uncond, draws, sched, cfg), cfg.loss,
                   cfg.huber_c)                                                   # 5.8


def prediction_and_target(student: X0Fn, teacher: X0Fn, x0: torch.Tensor, cond: Cond, uncond: Cond,
                          draws: SampleDraws, sched, cfg: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 5 steps 3-7: the student's prediction at s (with gradients) and its target (without);
    ``cond`` already has the empty-prompt replacement applied.

    ``student`` runs with the LoRA on and carries gradients; ``teacher`` is the LoRA-off model;
    ``sched`` is the family's schedule (:class:`DiscreteSchedule`, :class:`trainer.flow.FlowSchedule`).
    """
    dev = x0.device
    t, t_prev, s = draws.t.to(dev), draws.t_prev.to(dev), draws.s.to(dev)
    z_t = sched.noised(x0, draws.noise.to(dev, x0.dtype), t)                      # 5.3
    cond = sched.condition(cond, draws)

    with torch.no_grad():
        z_prev = sched.teacher_step(teacher, z_t, t, t_prev, cond, uncond, cfg.teacher_guidance)  # 5.5
        x0_tgt = student(z_prev, t_prev, cond)                                    # 5.7 online student target
        if cfg.method == "lcm":
            c_skip, c_out = lcm_boundary(t_prev, z_prev)
            target = c_skip * z_prev + c_out * x0_tgt
        else:
            target = sched.move_to(z_prev, x0_tgt, t_prev, s)

    x0_hat = student(z_t, t, cond)                                                # 5.4
    if cfg.method == "lcm":
        c_skip, c_out = lcm_boundary(t, z_t)
        pred = c_skip * z_t + c_out * x0_hat
    else:
        pred = sched.move_to(z_t, x0_hat, t, s)
    return pred, target
