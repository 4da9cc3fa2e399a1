"""The adversarial TDD variant (docs/method.md §5.2), for SD1.5, SD2.x and SDXL teachers.

The discriminator is the frozen teacher UNet itself, run with the LoRA switched off (no copy of the
weights), whose block outputs feed small trainable heads:

- SDXL: the end of each down level and the middle block (320/640/1280/1280 channels);
- SD1.5 / SD2.x: those plus the end of each up level (9 features).

Each head: 1x1 conv -> GroupNorm -> LeakyReLU, a residual 1x1 conv block of the same form, and a 1x1
conv to a logit map. Fake (the student's prediction at s) and real (the consistency target at s)
are each re-noised with their own fresh noise from s to ``t_gan ~ U[s, s + 250)`` before the
discriminator sees them. Hinge loss, averaged over heads; steps alternate by global step parity
(even: discriminator, odd: student with ``adv_weight`` x the generator term added).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .algorithm import Cond, DiscreteSchedule, sample_generator

GAN_SPAN = 250            # t_gan ~ U[s, s + 250), capped at the last timestep
HEAD_BETAS = (0.0, 0.999)  # the heads' AdamW (reference): lr --adv-lr (1e-5), betas (0, 0.999), wd 1e-3
HEAD_WEIGHT_DECAY = 1e-3
ARCHES = ("sd15", "sd2x", "sdxl")


def is_discriminator_step(step: int) -> bool:
    """Global step parity: even steps train the heads, odd steps the student (as the reference)."""
    return step % 2 == 0


def _level_ends(num_res_blocks: list[int], upsampling: bool) -> list[int]:
    """Index of the last block of each resolution level in ``input_blocks`` (its downsampler, except
    on the last level; ``input_blocks[0]`` is the stem) or in ``output_blocks`` (n + 1 blocks a level)."""
    ends, idx = [], -1 if upsampling else 0
    levels = list(reversed(num_res_blocks)) if upsampling else num_res_blocks
    for level, n in enumerate(levels):
        idx += n + 1 if upsampling or level < len(levels) - 1 else n
        ends.append(idx)
    return ends


def feature_blocks(unet, arch: str) -> list[nn.Module]:
    """The layers whose outputs the heads read (see the module docstring): the last layer of each chosen
    host UNet block (the host calls a block's layers one by one, so the block itself runs no hooks)."""
    if arch not in ARCHES:
        raise ValueError(f"no discriminator features for {arch!r}")
    nrb = list(unet.num_res_blocks)
    blocks = [unet.input_blocks[i] for i in _level_ends(nrb, upsampling=False)] + [unet.middle_block]
    if arch != "sdxl":
        blocks += [unet.output_blocks[i] for i in _level_ends(nrb, upsampling=True)]
    return [list(b)[-1] for b in blocks]


def block_channels(block: nn.Module) -> int:
    """Output channels of a UNet block: those of its last conv/linear layer."""
    last = [m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    return last.out_channels if isinstance(last, nn.Conv2d) else last.out_features


class Head(nn.Module):
    """1x1 conv -> GroupNorm -> LeakyReLU, a residual block of the same, 1x1 conv to one logit."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU())
        self.conv_out = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.float())
        return self.conv_out(self.conv2(x) + x)


class Heads(nn.Module):
    """One :class:`Head` per feature, initialised from ``seed`` (the global RNG is left alone)."""

    def __init__(self, channels: list[int], seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + 7919)
            self.heads = nn.ModuleList(Head(c) for c in channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features)]


class _Collect:
    """Forward hooks that record the feature blocks' outputs during one teacher call."""

    def __init__(self, blocks):
        self.blocks, self.out, self.handles = blocks, [], []

    def __enter__(self):
        self.out = []
        self.handles = [b.register_forward_hook(lambda m, i, o: self.out.append(o)) for b in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Discriminator:
    """Frozen teacher features (LoRA off, via ``network.disabled()``) + trainable :class:`Heads`."""

    def __init__(self, teacher, network, seed: int = 0):
        if teacher.arch not in ARCHES:
            raise ValueError(f"the adversarial variant supports {', '.join(ARCHES)} teachers, not {teacher.arch}")
        self.teacher, self.network = teacher, network
        self.blocks = feature_blocks(teacher.unet, teacher.arch)
        self.heads = Heads([block_channels(b) for b in self.blocks], seed).to(teacher.device)

    def features(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
        """The teacher's block outputs for VP latents ``z`` at timesteps ``t``, LoRA off."""
        with self.network.disabled(), _Collect(self.blocks) as c:
            self.teacher.x0(z, t, cond)
        return c.out

    def logits(self, z, t, cond) -> list[torch.Tensor]:
        return self.heads(self.features(z, t, cond))

    def d_loss(self, fake, real, t, cond: Cond) -> torch.Tensor:
        """Hinge: mean relu(1 + D(fake)) + mean relu(1 - D(real)), averaged over heads (one batched pass)."""
        n = fake.shape[0]
        both = self.logits(torch.cat([fake.detach(), real.detach()]), torch.cat([t, t]), cond.cat(cond))
        return sum(F.relu(1 + o[:n]).mean() + F.relu(1 - o[n:]).mean() for o in both) / len(both)

    def g_loss(self, fake, t, cond: Cond) -> torch.Tensor:
        """Generator hinge term: mean relu(1 - D(fake)), averaged over heads (gradient flows into ``fake``)."""
        out = self.logits(fake, t, cond)
        return sum(F.relu(1 - o).mean() for o in out) / len(out)


def renoise(x_s, s, t_gan, noise, sched: DiscreteSchedule):
    """Forward diffusion of VP latents from timestep ``s`` to ``t_gan >= s`` with ``noise``."""
    a_s, _ = sched.coeffs(s, x_s)
    a_g, _ = sched.coeffs(t_gan, x_s)
    ratio = (a_g / a_s) ** 2
    return ratio.sqrt() * x_s + (1.0 - ratio).clamp(min=0).sqrt() * noise


def draw_gan(seed: int, global_indices, s: torch.Tensor, shape):
    """Per sample (seeded by (seed, global sample index)): ``t_gan`` and the fake and real noises."""
    ts, fakes, reals = [], [], []
    for g, s_i in zip(global_indices, s.tolist()):
        gen = sample_generator(seed, g, stream="tdd-adv")
        hi = min(int(s_i) + GAN_SPAN, 1000)
        ts.append(int(torch.randint(int(s_i), hi, (1,), generator=gen)))
        fakes.append(torch.randn(tuple(shape), generator=gen))
        reals.append(torch.randn(tuple(shape), generator=gen))
    return torch.tensor(ts, dtype=torch.long), torch.stack(fakes), torch.stack(reals)
