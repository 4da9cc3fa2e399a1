"""Training data: captioned images from a folder (``x.png`` + ``x.txt``) or a ``.jsonl`` of
``{"path", "caption"}``; each image's shorter side is resized to the training resolution (kornia) and
encoded to its VAE posterior (mean, log-variance), which an optional on-disk cache keeps with the text
embeddings. Every sample then takes a square crop of that posterior in latent space - random by default,
the centre with ``--center-crop`` - and draws a fresh latent from it; the crop and the draw are seeded
by (seed, global sample index) like every other draw (:func:`trainer.algorithm.sample_generator`). The
crop's pixel offsets and the image's original size are SDXL's size conditioning.

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

from .algorithm import sample_generator

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Short video clips decoded with PyAV (what ComfyUI's own video loading uses).
VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".avi"}


class DataError(ValueError):
    """The data can't be used; the message names the problem and the fix."""


#: How many bad files a message or the LoRA's metadata names (the count is always complete).
SHOWN_BAD = 20


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    size: tuple[int, int] = (0, 0)  # (height, width) in pixels, as read at scan time
    frames: int = 1                 # a clip's frames (a video file, or a folder of frames); an image is 1


@dataclass(frozen=True)
class BadFile:
    """A training image left out, and why (named in the warning, the run's metadata, ``--strict-data``'s error)."""
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def _read_caption(img: Path, cap: Path) -> tuple[str | None, BadFile | None]:
    try:
        raw = cap.read_bytes()
    except OSError as e:
        return None, BadFile(str(img), f"its caption {cap.name} can't be read: {e.strerror or e}")
    try:
        return raw.decode("utf-8").strip(), None
    except UnicodeDecodeError as e:
        return None, BadFile(str(img), f"its caption {cap.name} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                       f"offset {e.start}); save it as UTF-8")


def _frame_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that are clips: a folder of frames with a same-named .txt caption beside it
    (``clip1/`` + ``clip1.txt``)."""
    return sorted(d for d in root.rglob("*") if d.is_dir() and d.with_suffix(".txt").is_file()
                  and any(f.suffix.lower() in IMAGE_EXTS for f in d.iterdir()))


def _scan_folder(root: Path) -> tuple[list[Item], list[BadFile]]:
    """Images and video clips with same-named .txt captions, and folders of frames captioned beside them."""
    try:
        clips = _frame_folders(root)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS
                       and not any(c in p.parents for c in clips))
    except PermissionError as e:
        raise DataError(f"cannot read data folder {root}: {e}; fix its permissions") from None
    items, bad, missing = [], [], []
    for img in sorted(files + clips):
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            missing.append(img)
            continue
        caption, problem = _read_caption(img, cap)
        if problem:
            bad.append(problem)
        else:
            items.append(Item(str(img), caption))
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise DataError(f"{len(missing)} image(s) in {root} have no caption file (e.g. {shown}): add a same-named "
                        ".txt next to each image (an empty .txt trains it unconditionally), or remove the image")
    return items, bad


def _jsonl_lines(path: Path):
    """(line number, text) of a .jsonl file; a line that is not UTF-8 is an error naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                                f"{e.start} of the line): save the file as UTF-8") from None


def _scan_jsonl(path: Path) -> list[Item]:
    items = []
    for lineno, line in _jsonl_lines(path):
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


def scan(data, strict: bool = False, workers: int = 1, warn: bool = True) -> tuple[list[Item], list[BadFile]]:
    """Captioned items of a folder or .jsonl, each image decoded once in full so that every bad file -
    corrupt, truncated, empty, not an image, a caption that is not UTF-8 - is found here, before the teacher
    loads, not in the middle of training. Bad files are skipped with one warning each (``warn=False``: a
    caller that only looks; ``strict``: a :class:`DataError` naming them all instead). The items keep the
    sorted (folder) or file (.jsonl) order, so the training order, a function of the good items only, is
    the same in every process."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"training data not found: {root}; pass --data DIR (images with .txt captions) or a .jsonl")
    bad: list[BadFile] = []
    if root.is_dir():
        if not os.access(root, os.R_OK | os.X_OK):
            raise DataError(f"cannot read data folder {root}: permission denied; fix its permissions")
        items, bad = _scan_folder(root)
    elif root.suffix.lower() == ".jsonl":
        items = _scan_jsonl(root)
    else:
        raise DataError(f"--data {root} is neither a folder nor a .jsonl file")
    good = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        for it, (size, problem, frames) in zip(items, pool.map(inspect_item, [it.path for it in items])):
            if problem:
                bad.append(BadFile(it.path, problem))
            else:
                good.append(Item(it.path, it.caption, size, frames))
    bad.sort(key=lambda b: b.path)
    if bad and strict:
        raise DataError(f"--strict-data: {len(bad)} bad file(s) in {root}: {describe_bad(bad)}. Fix or remove "
                        "them, or drop --strict-data to train without them (each is skipped with a warning)")
    for b in bad if warn else ():
        log.warning("skipping %s: %s", b.path, b.reason)
    if not good:
        raise DataError(f"no usable training images in {root} ({len(bad)} undecodable): add images "
                        f"({', '.join(sorted(IMAGE_EXTS))}) with same-named .txt captions")
    if bad and warn:
        log.warning("skipped %d of %d training images (named above); --strict-data makes that an error",
                    len(bad), len(bad) + len(good))
    return good, bad


def frame_paths(folder: str) -> list[str]:
    """The frames of a frame folder, in name order."""
    return [str(f) for f in sorted(Path(folder).iterdir()) if f.suffix.lower() in IMAGE_EXTS]


def video_size_and_frames(path: str) -> tuple[tuple[int, int], int]:
    """((height, width), frame count) of a video file, decoding it with PyAV without keeping its frames."""
    import av

    size, count = (0, 0), 0
    with av.open(path) as container:
        for frame in container.decode(video=0):
            if not count:
                size = (frame.height, frame.width)
            count += 1
    return size, count


def decode_video(path: str, frames: int | None = None) -> list[np.ndarray]:
    """The first ``frames`` (all: None) RGB frames of a video file, with PyAV."""
    import av

    out = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if frames is not None and len(out) >= frames:
                break
    return out


def inspect_item(path: str) -> tuple[tuple[int, int] | None, str | None, int]:
    """((height, width), None, frames) for an image, a frame folder or a video that decodes, or (None, why, 0)."""
    if os.path.isdir(path):
        frames = frame_paths(path)
        for f in frames:
            size, problem = inspect_image(f)
            if problem:
                return None, f"frame {os.path.basename(f)}: {problem}", 0
        return size, None, len(frames)
    if Path(path).suffix.lower() in VIDEO_EXTS:
        try:
            size, count = video_size_and_frames(path)
        except Exception as e:  # av raises its own error types for broken containers
            return None, f"not a video PyAV can decode ({type(e).__name__}: {e})", 0
        if not count:
            return None, "a video without frames", 0
        return size, None, count
    size, problem = inspect_image(path)
    return size, problem, 1 if problem is None else 0


def inspect_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) for an image that decodes in full, or (None, why not)."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as im:
            im.load()  # Image.open reads the header only: a truncated file fails here
            return (im.height, im.width), None
    except FileNotFoundError:
        return None, "no such file"
    except Image.UnidentifiedImageError:
        return None, "not an image PIL can read (another format under an image extension, or a corrupt header)"
    except Image.DecompressionBombError as e:
        return None, f"refused as a decompression bomb ({e})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return None, f"truncated or corrupt image ({e})"


def describe_bad(bad: list[BadFile], shown: int = SHOWN_BAD) -> str:
    """The first ``shown`` bad files with their reasons, and how many more."""
    text = "; ".join(str(b) for b in bad[:shown])
    return text + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")


def load_image(path: str, resolution: int, multiple: int = 8) -> torch.Tensor:
    """[3, R, W'] (or [3, H', R]) in [0, 1]: shorter side resized to R (antialiased, kornia), the longer side
    trimmed at its end to a multiple of ``multiple`` (the VAE's pixels per latent cell). Not cropped square:
    the crop is taken per sample in latent space (:meth:`TrainData.fetch`)."""
    x = torch.from_numpy(_read_rgb(path)).permute(2, 0, 1).float().div(255.0)[None]
    return _resized(x, resolution, multiple)[0]


def _read_rgb(path: str) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _resized(x: torch.Tensor, resolution: int, multiple: int) -> torch.Tensor:
    """[N, 3, H, W] -> shorter side ``resolution`` (antialiased, kornia), longer side trimmed to ``multiple``."""
    import kornia

    h, w = x.shape[-2:]
    if min(h, w) != resolution:
        x = kornia.geometry.transform.resize(x, resolution, side="short", antialias=True)
    h, w = x.shape[-2:]
    return x[..., :h // multiple * multiple, :w // multiple * multiple].clamp(0, 1)


def load_clip(path: str, resolution: int, frames: int, multiple: int = 8) -> torch.Tensor:
    """[3, T, R, W'] in [0, 1]: the first ``frames`` frames of a video file or frame folder (an image is a
    1-frame clip), each resized as :func:`load_image` does."""
    if os.path.isdir(path):
        arrays = [_read_rgb(f) for f in frame_paths(path)[:frames]]
    elif Path(path).suffix.lower() in VIDEO_EXTS:
        arrays = decode_video(path, frames)
    else:
        return load_image(path, resolution, multiple)[:, None]
    if len(arrays) < frames:
        raise ValueError(f"{len(arrays)} frames, fewer than the {frames} the run trains on")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
    return _resized(x, resolution, multiple).permute(1, 0, 2, 3).contiguous()


def crop_offsets(latent_hw: tuple[int, int], size: int, gen: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of a ``size`` x ``size`` crop of a ``latent_hw`` latent: uniform with ``gen``, centred without."""
    h, w = latent_hw
    if gen is None:
        return (h - size) // 2, (w - size) // 2
    top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return top, left


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


def same_length(*contexts: torch.Tensor) -> list[torch.Tensor]:
    """Text states [B, L, D] padded with zeros to the longest L, so captions of text encoders whose
    output length varies (LLM encoders; CLIP always gives 77) batch together."""
    longest = max(c.shape[1] for c in contexts)
    return [c if c.shape[1] == longest else torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1]))
            for c in contexts]


class TrainData:
    """Items + encoding (VAE/CLIP through the teacher) + optional cache; yields x0 latents and text states."""

    def __init__(self, items: list[Item], teacher, resolution: int, cache_dir: str | None = None,
                 num_workers: int = 2, skipped: int = 0, seed: int = 0, center_crop: bool = False, frames: int = 1):
        small = [it for it in items if 0 < min(it.size) < resolution]
        if small:
            h, w = small[0].size
            raise DataError(f"{len(small)} training image(s) are smaller than the {resolution}x{resolution} crop, e.g. "
                            f"{small[0].path} ({w}x{h}): train at a --resolution of at most "
                            f"{min(min(it.size) for it in small) // 8 * 8}, or upscale or remove those images")
        self.items, self.teacher, self.resolution = items, teacher, resolution
        self.seed, self.center_crop, self.frames = seed, center_crop, int(frames)
        short = [it for it in items if it.frames < self.frames]
        if short:
            raise DataError(f"{len(short)} training item(s) have fewer than the {self.frames} frames the run trains on, "
                            f"e.g. {short[0].path} ({short[0].frames}): lower --frames (1 mixes images and clips: each "
                            "clip's first frame), or remove them")
        self.video = self.frames > 1 or getattr(teacher, "latent_dims", 2) == 3
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
        frames = f"|{self.frames}f" if self.video else ""
        key = (f"posterior|{self.teacher.fingerprint}|{self.resolution}{frames}|{os.path.abspath(it.path)}|{st.st_mtime_ns}|"
               f"{st.st_size}|{it.caption}")
        return self.cache_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def _pixels(self, i: int) -> torch.Tensor | None:
        try:
            clip = load_clip(self.items[i].path, self.resolution, self.frames, self.teacher.latent_factor)
            return clip if self.video else clip[:, 0]   # an image family: an image, or a clip's first frame
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

    def _encode(self, ok: list[int], pixels: dict) -> dict[int, dict]:
        """Posterior + text records of decoded items ``ok`` (images of one shape encode as one batch)."""
        recs = {}
        ctx, pooled = self.teacher.encode_text([self.items[j].caption for j in ok])
        by_shape: dict[tuple, list[int]] = {}
        for j in ok:
            by_shape.setdefault(tuple(pixels[j].shape), []).append(j)
        for group in by_shape.values():
            mean, logvar = self.teacher.encode_posterior(torch.stack([pixels[j] for j in group]))
            for n, j in enumerate(group):
                recs[j] = {"mean": mean[n], "logvar": logvar[n], "size": torch.tensor(self.items[j].size)}
        for n, j in enumerate(ok):
            recs[j]["context"] = ctx[n]
            if pooled is not None:
                recs[j]["pooled"] = pooled[n]
        return recs

    def records(self, indices: list[int]) -> dict[int, dict]:
        """Dataset index -> its record (from the cache, or encoded now and cached); undecodable images are
        replaced by the next decodable one, the same way in every process."""
        out: dict[int, dict] = {}
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
                for j, rec in self._encode(ok, pixels).items():
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
        return out

    def fetch(self, indices: list[int], global_indices: list[int]):
        """-> (x0 [B, C, r, r], context [B, L, D], pooled [B, P] | None, geometry) for dataset ``indices``
        seen as global samples ``global_indices``: each sample's crop of its posterior and its latent draw
        come from ``sample_generator(seed, global index, "data")``. ``geometry``: per sample
        ``(original_h, original_w, crop_top, crop_left)`` in pixels (SDXL's size conditioning)."""
        recs = self.records(indices)
        f = self.teacher.latent_factor
        size = self.resolution // f
        latents, geometry = [], []
        for i, g in zip(indices, global_indices):
            rec = recs[i]
            gen = sample_generator(self.seed, g, "data")
            top, left = crop_offsets(tuple(rec["mean"].shape[-2:]), size, None if self.center_crop else gen)
            mean = rec["mean"][..., top:top + size, left:left + size]   # [C, (T,) h, w]
            std = torch.exp(0.5 * rec["logvar"][..., top:top + size, left:left + size])
            latents.append(mean + std * torch.randn(mean.shape, generator=gen))
            oh, ow = (int(v) for v in rec["size"])
            geometry.append((oh, ow, top * f, left * f))
        x0 = self.teacher.latent_in(torch.stack(latents))
        pooled = torch.stack([recs[i]["pooled"] for i in indices]) if "pooled" in recs[indices[0]] else None
        return x0, torch.cat(same_length(*[recs[i]["context"][None] for i in indices])), pooled, geometry

    def precompute(self, rank: int = 0, world: int = 1, batch: int = 8) -> None:
        """Fill the cache (each process a strided share); undecodable images are found and counted here."""
        mine = list(range(rank, len(self.items), world))
        for k in range(0, len(mine), batch):
            chunk = mine[k:k + batch]
            if all(self._cache_path(i).is_file() for i in chunk):
                continue
            self.records(chunk)
