"""The measuring instrument for the demo domain: an attribute classifier and its feature space.

A small seeded CNN reads a 64x64 image of ``demo/dataset.py``'s domain and names its five attributes
(shape, colour, pattern, position, background). It serves two jobs in ``bench/quality.py``:

- **prompt adherence**: a generated image is right on an attribute when the classifier reads the
  attribute its prompt asked for;
- **a domain Frechet distance**: its penultimate 128-d features embed images for a Frechet distance
  against real dataset images (an "FID" whose network knows this domain, unlike Inception).

It is torch + numpy only (no ComfyUI). Rebuild the weights with ``demo/train_classifier.py``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from demo import dataset

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instrument", "attribute_net.safetensors")
ATTRIBUTES = {
    "shape": list(dataset.SHAPES),
    "colour": list(dataset.COLOURS),
    "pattern": list(dataset.PATTERNS),
    "position": list(dataset.POSITIONS),
    "background": list(dataset.BACKGROUNDS),
}
FEATURES = 128


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeNet(nn.Module):
    """Four stride-2 conv stages (64 -> 4 px), a flattened 4x4 map (so position survives), a 128-d
    feature layer and one linear head per attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_block(3, 32, 2), _block(32, 64, 2), _block(64, 96, 2), _block(96, 96, 2))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(96 * 4 * 4, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURES, len(values)) for name, values in ATTRIBUTES.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` images in [-1, 1] -> ``(N, 128)`` penultimate features."""
        return self.features(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x)
        return {name: head(f) for name, head in self.heads.items()}


def to_input(images) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images (or float in [-1, 1] ``(N, 3, H, W)`` tensors) -> the net's input."""
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point and images.shape[1] == 3:
        return images.float()
    x = torch.as_tensor(np.asarray(images)).float()
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def labels(scenes) -> dict[str, torch.Tensor]:
    """Class indices of each attribute for a list of :class:`demo.dataset.Scene`."""
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in ATTRIBUTES.items()}


def load(path: str = WEIGHTS) -> AttributeNet:
    """The committed instrument, in eval mode."""
    import safetensors.torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute classifier weights '{path}' are missing; rebuild them with "
                                "`.venv/bin/python demo/train_classifier.py`")
    net = AttributeNet()
    net.load_state_dict(safetensors.torch.load_file(path))
    return net.eval()


@torch.no_grad()
def read(net: AttributeNet, images, batch: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> ({attribute: predicted class index per image}, features ``(N, 128)``)."""
    x = to_input(images)
    preds = {name: [] for name in ATTRIBUTES}
    feats = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        f = net.embed(chunk)
        feats.append(f)
        for name, head in net.heads.items():
            preds[name].append(head(f).argmax(1))
    return {k: torch.cat(v).numpy() for k, v in preds.items()}, torch.cat(feats).numpy().astype(np.float64)
