"""The trainer's data pipeline on the tiny host-class models (CPU): the cached VAE posterior and a fresh
latent draw per sample, random crops (or --center-crop) in latent space seeded by the global sample index,
SDXL's size conditioning from each image's real geometry and crop, and images smaller than the crop."""
from __future__ import annotations

import pytest
import torch

import trainer_fixtures as fx

from trainer import data
from trainer.loop import train
from trainer.models import from_components

pytestmark = pytest.mark.usefixtures("trainer_host")


@pytest.fixture(scope="module")
def teacher():
    return from_components(*fx.tiny_sd15(0))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two 96x64 images: at 64 px, 12 latent columns to take an 8-cell crop from."""
    return fx.make_images(tmp_path_factory.mktemp("wide"), 2, size=(96, 64))


def _data(folder, teacher, **kw):
    items, _ = data.scan(folder)
    return data.TrainData(items, teacher, fx.RESOLUTION, num_workers=0, **kw)


def test_posterior_mean_is_the_hosts_encoding(teacher):
    """encode_posterior's mean is what the host's VAE encode returns (its mode); the spread is finite."""
    px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, logvar = teacher.encode_posterior(px)
    assert torch.allclose(teacher.latent_in(mean), teacher.encode_images(px), atol=1e-5)
    assert mean.shape == logvar.shape == (1, 4, 8, 8) and torch.isfinite(logvar).all()
    assert float(logvar.exp().mean()) > 1e-6  # a real spread: draws differ from the mean


def test_random_crops_and_fresh_draws_per_global_sample(teacher, wide):
    d = _data(wide, teacher, seed=3)
    x_a, _, _, geo_a = d.fetch([0, 0, 0, 0], [0, 1, 2, 3])
    x_again, _, _, geo_again = d.fetch([0], [2])
    assert torch.equal(x_again[0], x_a[2]) and geo_again[0] == geo_a[2]  # a function of (seed, global index)
    assert x_a.shape == (4, 4, 8, 8)
    lefts = {g[3] for g in geo_a + d.fetch([0] * 12, list(range(4, 16)))[3]}
    assert len(lefts) > 2 and lefts <= {0, 8, 16, 24, 32}  # 12 latent columns, crop 8: offsets 0..4 cells
    assert all(g[:3] == (64, 96, 0) for g in geo_a)  # original (h, w) of the file; no vertical room
    for a, b in zip(x_a, x_a[1:]):
        assert not torch.allclose(a, b)
    other_seed = _data(wide, teacher, seed=4).fetch([0], [2])[0]
    assert not torch.allclose(other_seed[0], x_a[2])


def test_center_crop_and_posterior_draws_average_to_the_mean(teacher, wide):
    d = _data(wide, teacher, center_crop=True)
    n = 256
    x, _, _, geo = d.fetch([1] * n, list(range(n)))
    assert {g for g in geo} == {(64, 96, 0, 16)}  # centred: (12 - 8) / 2 = 2 cells = 16 px
    rec = d.records([1])[1]
    mean = teacher.latent_in(rec["mean"][None, :, :, 2:10])[0]
    std = teacher.latent_in(rec["mean"][None, :, :, 2:10] + torch.exp(0.5 * rec["logvar"][None, :, :, 2:10]))[0] - mean
    assert float((x.std(0) / std.abs()).mean()) == pytest.approx(1.0, abs=0.1)  # draws spread as the posterior
    assert float(((x.mean(0) - mean).abs() / std.abs()).mean()) < 4 / n ** 0.5


def test_cache_holds_the_posterior(teacher, wide, tmp_path):
    """The same global samples come out of the cache as from encoding (the cache is not one frozen sample)."""
    fresh = _data(wide, teacher, seed=1).fetch([0, 1, 0], [5, 6, 7])
    cached = _data(wide, teacher, seed=1, cache_dir=str(tmp_path))
    cached.precompute()
    rec = next(iter(tmp_path.glob("*.safetensors")))
    from safetensors.torch import load_file
    assert {"mean", "logvar", "context", "size"} <= set(load_file(str(rec)))
    again = cached.fetch([0, 1, 0], [5, 6, 7])
    assert torch.allclose(again[0], fresh[0], atol=1e-6) and again[3] == fresh[3]


def test_sdxl_size_conditioning_from_geometry():
    """Each sample's ADM vector carries its own original size and crop; the teacher's uncond keeps them."""
    sdxl = from_components(*fx.tiny_sdxl())
    ctx, pooled = sdxl.encode_text(["a", "b"])
    geo = [(64, 96, 0, 16), (300, 200, 24, 0)]
    c = sdxl.make_cond(ctx, pooled, 64, 64, geo)
    for i, (oh, ow, top, left) in enumerate(geo):
        one = sdxl.model.encode_adm(pooled_output=pooled[i:i + 1], height=oh, width=ow, crop_h=top, crop_w=left,
                                    target_height=64, target_width=64)
        assert torch.allclose(c.y[i], one[0].to(c.y.device))
    plain = sdxl.make_cond(ctx, pooled, 64, 64)
    assert not torch.allclose(plain.y, c.y)
    u = sdxl.uncond(ctx, pooled, 64, 64, geo)
    p = pooled.shape[1]
    assert torch.count_nonzero(u.y[:, :p]) == 0 and torch.allclose(u.y[:, p:], c.y[:, p:])


def test_images_smaller_than_the_crop_are_refused(tmp_path):
    small = fx.make_images(tmp_path / "d", 2, size=(80, 48))
    with pytest.raises(data.DataError, match=r"2 training image\(s\) are smaller than the 64x64 crop.*"
                                             r"img_000.png \(80x48\).*--resolution of at most 48"):
        train(fx.train_config(small, tmp_path, max_steps=1), components=fx.tiny_sd15(0))
