"""Training data: captioned images from a folder (``x.png`` + ``x.txt``) or a ``.jsonl`` of
``{"path", "caption"}``; centre-crop/resize with kornia; optional on-disk cache of latents and text
embeddings.

Order is a pure function of (seed, global sample counter): :func:`global_order` maps the counter to
a dataset index through a seeded per-epoch permutation, so every process computes the same global
batch and takes its own slice, and a resumed run continues at the same place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """The data can't be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Item:
    path: str
    caption: str


def _scan_folder(root: Path) -> list[Item]:
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    except PermissionError as e:
        raise DataError(f"cannot read data folder {root}: {e}; fix its permissions") from None
    items, missing = [], []
    for img in files:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            missing.append(img)
            continue
        items.append(Item(str(img), cap.read_text(encoding="utf-8").strip()))
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise DataError(f"{len(missing)} image(s) in {root} have no caption file (e.g. {shown}): add a same-named "
                        ".txt next to each image (an empty .txt trains it unconditionally), or remove the image")
    return items


def _scan_jsonl(path: Path) -> list[Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e}); each line must be "
                                '{"path": ..., "caption": ...}') from None
            if not isinstance(rec, dict) or "path" not in rec:
                raise DataError(f'{path}:{lineno} has no "path"; each line must be {{"path": ..., "caption": ...}}')
            if not isinstance(rec.get("caption"), str):
                raise DataError(f'{path}:{lineno} ({rec["path"]}) has no "caption" string; add one (use "" to train '
                                "that image unconditionally)")
            p = Path(rec["path"])
            items.append(Item(str(p if p.is_absolute() else path.parent / p), rec["caption"].strip()))
    return items


def scan(data) -> tuple[list[Item], list[str]]:
    """Captioned items of a folder or .jsonl; files PIL can't even identify are skipped and counted."""
    from PIL import Image

    root = Path(data)
    if not root.exists():
        raise DataError(f"training data not found: {root}; pass --data DIR (images with .txt captions) or a .jsonl")
    if root.is_dir():
        if not os.access(root, os.R_OK | os.X_OK):
            raise DataError(f"cannot read data folder {root}: permission denied; fix its permissions")
        items = _scan_folder(root)
    elif root.suffix.lower() == ".jsonl":
        items = _scan_jsonl(root)
    else:
        raise DataError(f"--data {root} is neither a folder nor a .jsonl file")
    good, bad = [], []
    for it in items:
        try:
            with Image.open(it.path) as im:
                im.size  # noqa: B018 - header parsed
            good.append(it)
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(it.path)
    if bad:
        log.warning("skipped %d undecodable image(s), e.g. %s", len(bad), bad[0])
    if not good:
        raise DataError(f"no usable training images in {root} ({len(bad)} undecodable): add images "
                        f"({', '.join(sorted(IMAGE_EXTS))}) with same-named .txt captions")
    return good, bad


def load_image(path: str, resolution: int) -> torch.Tensor:
    """[3, R, R] in [0, 1]: shorter side resized to R (antialiased), then centre-cropped (kornia)."""
    import kornia
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.uint8).copy()
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0)[None]
    h, w = x.shape[-2:]
    if min(h, w) != resolution:
        x = kornia.geometry.transform.resize(x, resolution, side="short", antialias=True)
    x = kornia.geometry.transform.center_crop(x, (resolution, resolution))
    return x[0].clamp(0, 1)


def dataset_id(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{os.path.basename(it.path)}\0{it.caption}\n".encode())
    return f"{len(items)}-{h.hexdigest()[:12]}"


def global_order(seed: int, counter: int, n: int) -> int:
    """Dataset index of global sample ``counter``: a seeded permutation per epoch."""
    epoch, pos = divmod(int(counter), n)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=gen)[pos])


class TrainData:
    """Items + encoding (VAE/CLIP through the teacher) + optional cache; yields x0 latents and text states."""

    def __init__(self, items: list[Item], teacher, resolution: int, cache_dir: str | None = None,
                 num_workers: int = 2, skipped: int = 0):
        self.items, self.teacher, self.resolution = items, teacher, resolution
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.skipped = skipped
        self.bad: set[int] = set()
        self.pool = ThreadPoolExecutor(max(1, num_workers)) if num_workers > 0 else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self):
        return len(self.items)

    def _cache_path(self, i: int) -> Path:
        it = self.items[i]
        st = os.stat(it.path)
        key = f"{self.teacher.fingerprint}|{self.resolution}|{os.path.abspath(it.path)}|{st.st_mtime_ns}|{st.st_size}|{it.caption}"
        return self.cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def _pixels(self, i: int) -> torch.Tensor | None:
        try:
            return load_image(self.items[i].path, self.resolution)
        except (OSError, ValueError, SyntaxError) as e:
            if i not in self.bad:
                self.bad.add(i)
                self.skipped += 1
                log.warning("skipping undecodable image %s (%s); %d skipped so far", self.items[i].path, e, self.skipped)
            return None

    def _resolve(self, i: int) -> int:
        """``i``, or the next index whose image decodes (deterministic: every process skips alike)."""
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            if j in self.bad:
                continue
            return j
        raise DataError("no decodable training images left")

    def fetch(self, indices: list[int]):
        """-> (x0 [B, C, h, w], context [B, L, D], pooled [B, P] | None) for dataset ``indices``."""
        out: dict[int, tuple] = {}
        todo = list(indices)
        while todo:
            idx = [self._resolve(i) for i in todo]
            cached = {}
            if self.cache_dir:
                for j in idx:
                    p = self._cache_path(j)
                    if p.is_file():
                        from safetensors.torch import load_file
                        cached[j] = load_file(str(p))
            need = [j for j in dict.fromkeys(idx) if j not in cached]
            mapper = self.pool.map if self.pool else map
            pixels = dict(zip(need, mapper(self._pixels, need)))
            ok = [j for j in need if pixels[j] is not None]
            if ok:
                lat = self.teacher.encode_images(torch.stack([pixels[j] for j in ok]))
                ctx, pooled = self.teacher.encode_text([self.items[j].caption for j in ok])
                for n, j in enumerate(ok):
                    rec = {"latent": lat[n], "context": ctx[n]}
                    if pooled is not None:
                        rec["pooled"] = pooled[n]
                    cached[j] = rec
                    if self.cache_dir:
                        from .lora_format import atomic_save_safetensors
                        atomic_save_safetensors(rec, self._cache_path(j))
            nxt = []
            for i, j in zip(todo, idx):
                if j in cached:
                    out[i] = cached[j]
                else:
                    nxt.append(i)  # undecodable now: resolve again (skips it)
            todo = nxt
        recs = [out[i] for i in indices]
        pooled = torch.stack([r["pooled"] for r in recs]) if "pooled" in recs[0] else None
        return torch.stack([r["latent"] for r in recs]), torch.stack([r["context"] for r in recs]), pooled

    def precompute(self, rank: int = 0, world: int = 1, batch: int = 8) -> None:
        """Fill the cache (each process a strided share); undecodable images are found and counted here."""
        mine = list(range(rank, len(self.items), world))
        for k in range(0, len(mine), batch):
            chunk = mine[k:k + batch]
            if all(self._cache_path(i).is_file() for i in chunk):
                continue
            self.fetch(chunk)
