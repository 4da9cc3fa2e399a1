"""Batch-stable noise: image k of a batch does not depend on the batch size.

Two sources of noise reach an image: the initial latent noise (the host's, from the noise seed) and
the TDD step's fresh noise at every step but the last. The first already holds (proved here); the
second does with TDD Sampler's ``batch_stable_noise`` (each item's generator seeded by (seed, item
index)), and is unchanged with the option off.
"""
from __future__ import annotations

import pytest
import torch

from harness import pack_module, run_node

SEED = 123


def core():
    return pack_module().tdd_core


def draws(sampler, n=3):
    return [sampler(None, None) for _ in range(n)]


def test_item_noise_streams_do_not_depend_on_the_batch_size(host):
    c = core()
    big = draws(c.batch_stable_noise_sampler(torch.zeros(8, 4, 4, 4), SEED))
    for size in (1, 3):
        small = draws(c.batch_stable_noise_sampler(torch.zeros(size, 4, 4, 4), SEED))
        for a, b in zip(small, big):
            torch.testing.assert_close(a, b[:size], rtol=0, atol=0)
    assert not torch.equal(big[0][0], big[0][1])  # items differ from each other
    assert c.item_seed(0, 1) != c.item_seed(1, 0)  # (seed, index) pairs never share a stream
    # the default (one generator for the batch) does depend on it: item 0's second draw moves
    one = draws(c.default_noise_sampler(torch.zeros(1, 4, 4, 4), SEED))
    eight = draws(c.default_noise_sampler(torch.zeros(8, 4, 4, 4), SEED))
    torch.testing.assert_close(one[0][0], eight[0][0])
    assert not torch.allclose(one[1][0], eight[1][0])


def test_option_off_is_the_sampler_as_before(host):
    """Off (the default) the sampler draws from one seeded generator exactly as before the option."""
    c = core()
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 14.6
    sigmas = torch.tensor([14.6, 4.0, 1.5, 0.5, 0.0])
    denoiser = lambda z, s, seed=None: torch.tanh(z / (1 + s.reshape(-1, 1, 1, 1) ** 2) ** 0.5)
    before = c.sample_tdd(denoiser, x, sigmas, extra_args={"seed": SEED}, disable=True,
                          noise_sampler=c.default_noise_sampler(x, SEED))
    for kwargs in ({}, {"batch_stable_noise": False}):
        torch.testing.assert_close(c.sample_tdd(denoiser, x, sigmas, extra_args={"seed": SEED}, disable=True, **kwargs),
                                   before, rtol=0, atol=0)
    stable = c.sample_tdd(denoiser, x, sigmas, extra_args={"seed": SEED}, disable=True, batch_stable_noise=True)
    assert not torch.allclose(stable, before)


@pytest.fixture(scope="module")
def tiny(host):
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    (pos,) = run_node(host, "CLIPTextEncode", clip=clip, text="a red circle at the top left")
    (neg,) = run_node(host, "CLIPTextEncode", clip=clip, text="")
    return model, pos, neg


def latent(host, batch):
    return run_node(host, "EmptyLatentImage", width=32, height=32, batch_size=batch)[0]


def sample(host, tiny, lat, eta=0.2, **sampler_options):
    model, pos, neg = tiny
    (sampler,) = run_node(host, "TDDSampler", eta=eta, x0_clip_steps=0, **sampler_options)
    (sigmas,) = run_node(host, "TDDScheduler", model=model, steps=4, non_equidistant=False, denoise=1.0)
    out, _ = run_node(host, "SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=1.0, positive=pos,
                      negative=neg, sampler=sampler, sigmas=sigmas, latent_image=lat)
    return out["samples"]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # batched CPU kernels may differ in the last bits


def test_initial_latent_noise_already_holds(host, tiny):
    """The host's initial noise for item k is the same at batch sizes k+1 and 8, and when item k is
    taken alone from the batch (LatentFromBatch: batch size 1, batch_index k). With eta 0 (no step
    noise) the images agree too."""
    import comfy.sample

    eight = latent(host, 8)
    noise8 = comfy.sample.prepare_noise(eight["samples"], SEED)
    for k in range(8):
        torch.testing.assert_close(comfy.sample.prepare_noise(latent(host, k + 1)["samples"], SEED)[k], noise8[k],
                                   rtol=0, atol=0)
        alone = comfy.sample.prepare_noise(eight["samples"][k:k + 1], SEED, noise_inds=[k])
        torch.testing.assert_close(alone[0], noise8[k], rtol=0, atol=0)
    images = sample(host, tiny, eight, eta=0.0)
    for k in (0, 5):
        (alone,) = run_node(host, "LatentFromBatch", samples=eight, batch_index=k, length=1)
        close(sample(host, tiny, alone, eta=0.0)[0], images[k])


def test_batch_stable_step_noise(host, tiny):
    """eta 0.2, 4 steps (3 re-noisings): with the option, image k is the same at batch size 1, k+1
    and 8; without it, it is not."""
    stable8 = sample(host, tiny, latent(host, 8), batch_stable_noise=True)
    close(sample(host, tiny, latent(host, 1), batch_stable_noise=True)[0], stable8[0])
    close(sample(host, tiny, latent(host, 3), batch_stable_noise=True)[2], stable8[2])
    plain8 = sample(host, tiny, latent(host, 8))
    assert (sample(host, tiny, latent(host, 1))[0] - plain8[0]).abs().max() > 1e-2
    off = sample(host, tiny, latent(host, 8), batch_stable_noise=False)
    torch.testing.assert_close(off, plain8, rtol=0, atol=0)  # off = the default
