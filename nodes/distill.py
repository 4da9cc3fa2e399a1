"""TDD Distill -> MODEL, CLIP, LORA_MODEL, LOSS_MAP, steps, eta, guidance, info: distil a TDD LoRA
from the model loaded in the graph.

The node drives the pack's own trainer (``trainer/``: its config, presets, loop, checkpoints and LoRA
file format) on the host's already-loaded MODEL/CLIP/VAE through the trainer's model seam
(``trainer.models.from_components``); nothing of the algorithm is repeated here. What is here is the
host's side: where files go (``models/loras/<lora_name>.safetensors``, checkpoints under
``models/tdd_distill_runs/<lora_name>``), ComfyUI's progress bar and Cancel button, and reusing a
finished file instead of training again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import re
import sys

import comfy.model_management
import numpy as np
import torch
import comfy.utils
import folder_paths
from comfy_api.latest import io
from safetensors.torch import load_file

from . import lora_loader, lora_settings
from .validation import TDDNode

log = logging.getLogger("tdd")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_FOLDER = "tdd_distill_runs"  # under models/: checkpoints (outside models/loras, so never listed as LoRAs)
QUICK = "quick"
METHODS = {"tdd": ("tdd", False), "tdd-adv": ("tdd", True), "tcd": ("tcd", False), "lcm": ("lcm", False)}
BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


def trainer_module(name: str):
    """``trainer.<name>`` of this pack (the CLI's package, imported by its own name so that its
    absolute ``tdd_core`` imports resolve: the pack's root goes at the end of ``sys.path``)."""
    if REPO not in sys.path:
        sys.path.append(REPO)
    module = importlib.import_module(f"trainer.{name}")
    if not os.path.realpath(module.__file__).startswith(os.path.join(os.path.realpath(REPO), "trainer")):
        raise ImportError(f"another package named 'trainer' ({module.__file__}) shadows the TDD pack's trainer; "
                          "remove it from the Python path or rename it")
    return module


def preset_options() -> list[str]:
    return [QUICK] + [p for p in trainer_module("config").preset_names() if p != QUICK]


#: The ``images`` choice that trains on the ``image_batch`` input instead of a folder.
BATCH_CHOICE = "(the image_batch input)"


def image_folders() -> list[str]:
    """Sub-folders of ComfyUI's input directory (the training-image folders a user can pick), then
    :data:`BATCH_CHOICE`."""
    root = folder_paths.get_input_directory()
    out = []
    for dirpath, dirs, _ in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, d), root).replace(os.sep, "/") for d in dirs]
    return sorted(out) + [BATCH_CHOICE]


def batch_captions(captions: str, n: int) -> list[str]:
    """One caption per image of an IMAGE batch: one line per image, one line for all, or none (no prompt)."""
    lines = [line.strip() for line in (captions or "").strip().splitlines()]
    if len(lines) in (0, 1):
        return [lines[0] if lines else ""] * n
    if len(lines) != n:
        raise ValueError(f"TDD Distill: captions has {len(lines)} lines for an image_batch of {n} images; give one "
                         "line per image, or a single line for all of them")
    return lines


def write_image_batch(image_batch: torch.Tensor, captions: list[str]) -> str:
    """The IMAGE batch as a training folder under models/tdd_distill_runs/batches: PNGs with .txt
    captions, named by a hash of pixels and captions, so another batch is another data set (resume
    and reuse tell them apart) and the same batch is the same one."""
    from PIL import Image

    pixels = (image_batch.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    digest = hashlib.sha256(pixels.tobytes() + "\0".join(captions).encode()).hexdigest()[:16]
    folder = os.path.join(folder_paths.models_dir, RUNS_FOLDER, "batches", digest)
    if not os.path.isfile(os.path.join(folder, "complete")):
        os.makedirs(folder, exist_ok=True)
        for i, (img, caption) in enumerate(zip(pixels, captions)):
            name = os.path.join(folder, f"{digest[:8]}_{i:05d}")
            Image.fromarray(np.ascontiguousarray(img[..., :3])).save(name + ".png")
            with open(name + ".txt", "w", encoding="utf-8") as f:
                f.write(caption)
        open(os.path.join(folder, "complete"), "w").close()
    return folder


def lora_stem(name: str) -> str:
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def lora_name_problem(name: str) -> str | None:
    stem = lora_stem(name)
    if not stem.strip():
        return "lora_name is empty: give the new LoRA a file name for models/loras (e.g. my_model_tdd)"
    if BAD_NAME.search(stem) or stem in (".", "..") or ".." in stem or stem.startswith("."):
        return (f"lora_name = {name!r} is not a plain file name: path separators, '..' and leading dots are refused "
                "because the LoRA is always written to models/loras; use letters, digits, '-' and '_'")
    return None


def training_config(*, folder, out, run_dir, method, preset, steps, batch, lr, rank, seed, resolution,
                    gradient_checkpointing, precision, base_dtype, frames=1):
    """The trainer's TrainConfig: defaults < preset < the node's inputs (0 = keep the preset's value)."""
    config = trainer_module("config")
    preset_values = config.load_preset(preset)
    values = dict(preset_values)
    trainer_method, adversarial = METHODS[method]
    values.update(teacher="<ComfyUI model>", method=trainer_method, adversarial=adversarial, seed=seed, data=folder, out=out,
                  run_dir=run_dir, num_workers=0, progress=False, gradient_checkpointing=gradient_checkpointing,
                  precision=precision, base_dtype=base_dtype, validate_every=0, frames=frames,
                  overwrite=True)  # the node picks the file itself (output_path): a fresh name, or its overwrite input
    for name, value in (("max_steps", steps), ("batch_size", batch), ("lr", lr), ("rank", rank),
                        ("resolution", resolution)):
        if value:
            values[name] = value
    if batch:  # an explicit batch is the global batch: no accumulation to a preset's size
        values.pop("accumulate_to", None)
        values["grad_accum"] = 1
    if rank and "alpha" in values:  # keep the preset's alpha/rank scale
        values["alpha"] = values["alpha"] * rank / preset_values.get("rank", rank)
    cfg = config.TrainConfig(**values)
    cfg.world_size = 1
    return cfg.validate().resolve_accumulation()


def run_fingerprint(cfg, teacher, items) -> str:
    """The trainer's fingerprint of this run (what ``tdd_run_fingerprint`` in a finished file holds)."""
    config, data, loop = trainer_module("config"), trainer_module("data"), trainer_module("loop")
    probe = dataclasses.replace(cfg).apply_family_defaults(teacher.arch, teacher.row.defaults, teacher.flow)
    precision = loop.resolve_precision(cfg, loop.pick_device(cfg.device))
    return config.fingerprint(probe.fingerprint_fields(data.dataset_id(items), teacher.fingerprint, precision,
                                                       teacher.embedded_guidance))


def small_images(items, resolution: int) -> list:
    return [it for it in items if min(it.size) < resolution]


def output_path(stem: str, fp: str, steps: int, overwrite: bool) -> tuple[str, str]:
    """(path, how) for the LoRA file: the same file when it is this very run finished ("reuse"), else
    the name itself if free or ``overwrite``, else the first free ``<stem>_N``: a LoRA of another
    run is never replaced silently."""
    loras = folder_paths.get_folder_paths("loras")[0]
    read_meta = trainer_module("lora_format").read_tdd_metadata
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}_{n}"
        path = os.path.join(loras, name + ".safetensors")
        if not os.path.exists(path):
            return path, "new"
        meta = read_meta(path)
        if meta.get("tdd_run_fingerprint") == fp and meta.get("tdd_training_steps") == steps:
            return path, "reuse"
        if overwrite:
            return path, "overwrite"
        n += 1


class _Progress:
    """The trainer's steps on ComfyUI's progress bar, with step, loss and samples/s as the node's text;
    then calibration's model evaluations on the same bar (:meth:`calibration`)."""

    def __init__(self, total: int, start: int, node_id):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total, self.node_id = total, node_id
        self.bar.update_absolute(start, total)

    def __call__(self, run, row) -> None:
        if comfy.model_management.processing_interrupted():
            # Cancel: the trainer checkpoints at this step's end and returns "interrupted"; the bar is
            # not touched (the host's progress hook would raise before the checkpoint is written)
            run.request_stop()
            return
        self.bar.update_absolute(row["step"], self.total)
        text = f"step {row['step']}/{self.total}  loss {row['loss']:.4g}  {row['samples_per_s']:.1f} samples/s"
        if row["step"] % 10 == 0 or row["step"] == self.total:
            log.info("TDD Distill: %s", text)
        self._text(text)

    def calibration(self, run, done: int, total: int) -> None:
        """Calibration's progress (model evaluations) on the bar; Cancel stops it at the next evaluation
        (the checkpoint already holds every step; queueing again calibrates and writes the LoRA)."""
        if comfy.model_management.processing_interrupted():
            run.request_stop()
            return
        self.bar.update_absolute(done, total)
        self._text(f"calibrating the sampler settings: {done:,}/{total:,} model evaluations")

    def _text(self, text: str) -> None:
        server = sys.modules.get("server")
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        if self.node_id is not None and hasattr(instance, "send_progress_text"):
            instance.send_progress_text(text, self.node_id)


def release_inference_tensors(module: torch.nn.Module) -> None:
    """Replace parameters and buffers created under ``torch.inference_mode`` by normal tensors of the
    same values (in place, so the loaded model object stays the one other nodes hold)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def loss_history(run_dir: str) -> list[float]:
    """The run's losses, resumed segments included (the trainer's log.csv keeps one row per step)."""
    import csv
    with open(os.path.join(run_dir, "log.csv"), newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


class TDDDistill(TDDNode):
    # checked before the prompt runs: the folder list (the other combos have fixed options and are
    # checked, with lora_name and the numbers, when the node starts, each error naming its input)
    VALIDATED = ("images",)
    INPUT_HINTS = {"images": "put a folder of images (with same-named .txt captions) under ComfyUI's input "
                             "directory and refresh (R) the node list"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDDistill",
            display_name="TDD Distill",
            category="training",
            is_output_node=True,  # it writes models/loras/<lora_name>.safetensors
            description="Distil a Target-Driven Distillation LoRA from the loaded model (any family ComfyUI runs: SD1.5/"
                        "SD2.x/SDXL, FLUX.1/FLUX.2, SD3, Qwen-Image, Lumina 2, Z-Image, Chroma, Wan, HunyuanVideo, ... docs/families.md) "
                        "on a folder of captioned images, with the pack's trainer. Writes models/loras/<lora_name>"
                        ".safetensors; Cancel stops with a checkpoint that resume continues.",
            inputs=[
                io.Model.Input("model", tooltip="The model to distil (the teacher); the LoRA is trained on it."),
                io.Clip.Input("clip", tooltip="The model's text encoder (captions are encoded with it)."),
                io.Vae.Input("vae", tooltip="The model's VAE (training images are encoded with it)."),
                io.Combo.Input("images", options=image_folders(),
                               tooltip="A folder under ComfyUI's input directory: images with same-named .txt "
                                       "captions (an empty .txt trains that image without a prompt); or "
                                       f"{BATCH_CHOICE} to train on the IMAGE batch wired into image_batch."),
                io.Combo.Input("method", options=list(METHODS), default="tdd",
                               tooltip="tdd (Target-Driven Distillation), tdd-adv (with the adversarial loss; "
                                       "SD-family models), tcd, lcm."),
                io.Combo.Input("preset", options=preset_options(), default=QUICK,
                               tooltip="Training settings: quick (a short run to try the method), or the TDD "
                                       "reference's settings for a family (sd15, sdxl, sdxl-adv, flux; long runs)."),
                io.Int.Input("steps", default=0, min=0, max=1_000_000,
                             tooltip="Optimizer steps; 0 = the preset's."),
                io.Int.Input("batch", default=0, min=0, max=4096,
                             tooltip="Images per step; 0 = the preset's (with its gradient accumulation)."),
                io.Float.Input("lr", default=0.0, min=0.0, max=1.0, step=1e-6,
                               tooltip="Learning rate; 0 = the preset's (else the family's default)."),
                io.Int.Input("rank", default=0, min=0, max=1024,
                             tooltip="LoRA rank; 0 = the preset's. alpha follows it at the preset's alpha/rank."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seeds the LoRA's initialisation and every draw of the run (reproducible)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                             tooltip="Training resolution in pixels (a multiple of 8); 0 = the preset's, else the "
                                     "model's native size. Images smaller than this are refused."),
                io.String.Input("lora_name", default="my_tdd_lora",
                                tooltip="File name of the new LoRA in models/loras (no folders, no '..')."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue an interrupted run of this lora_name from its checkpoint (the "
                                         "result equals an uninterrupted run); off starts afresh."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing LoRA of this name from another run; off writes "
                                         "<lora_name>_2, _3, ... instead. A file from this very run is reused."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute activations in the backward pass: less memory, slower."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16", "fp16"], default="auto", optional=True,
                               tooltip="Autocast precision (auto: bf16/fp16 on GPU, fp32 on CPU)."),
                io.Combo.Input("base_dtype", options=["auto", "fp32", "bf16", "fp16", "fp8"], default="auto",
                               optional=True,
                               tooltip="Storage dtype of the frozen model while training (auto keeps fp32)."),
                # (last, so that the widget values of workflows saved before them keep their places)
                io.Image.Input("image_batch", optional=True,
                               tooltip=f"Training images as an IMAGE batch (e.g. from Load Image nodes), used when "
                                       f"images is {BATCH_CHOICE}."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="Captions of image_batch: one line per image, or one line for all of them; "
                                        "empty trains without a prompt."),
                io.Int.Input("frames", default=1, min=1, max=1024, optional=True,
                             tooltip="Frames per training clip for video families (Wan, HunyuanVideo...): the images "
                                     "folder may hold short videos (.mp4/.webm/.mov/.mkv/.avi) and folders of frames, "
                                     "each with a same-named .txt caption; 1 trains on images and each clip's first "
                                     "frame."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the new LoRA at its trained scale."),
                io.Clip.Output(tooltip="The text encoder (unchanged: TDD trains the diffusion model only)."),
                io.Custom("LORA_MODEL").Output(display_name="lora",
                                               tooltip="The LoRA's tensors, for Save LoRA / Load LoRA Model."),
                io.Custom("LOSS_MAP").Output(display_name="loss", tooltip="Loss per step, for Plot Loss Graph."),
                *lora_settings.outputs("recommended_"),
                io.String.Output("info", display_name="info", tooltip="What was trained or reused, and where the files are."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        # ComfyUI runs nodes under torch.inference_mode(); training needs autograd, and tensors made in
        # inference mode (the loaded weights, the schedule) can't be saved for backward
        with torch.inference_mode(False), torch.enable_grad():
            return cls.distill(**inputs)

    @classmethod
    def distill(cls, model, clip, vae, images, method, preset, steps, batch, lr, rank, seed, resolution,
                lora_name, resume, overwrite, image_batch=None, captions="", gradient_checkpointing=False,
                precision="auto", base_dtype="auto", frames=1) -> io.NodeOutput:
        cls.check_values(method=method, preset=preset, steps=steps, batch=batch, lr=lr, rank=rank, seed=seed,
                         resolution=resolution, precision=precision, base_dtype=base_dtype)
        problem = lora_name_problem(lora_name)
        if problem:
            raise ValueError(f"TDD Distill: {problem}")
        data, models = trainer_module("data"), trainer_module("models")
        family_problem = trainer_module("families").family_problem(  # classes only: before any work
            model.model, model.get_model_object("model_sampling"))
        if family_problem:
            raise ValueError(f"TDD Distill: {family_problem}")
        if images == BATCH_CHOICE:
            if image_batch is None:
                raise ValueError(f"TDD Distill: images is {BATCH_CHOICE} but nothing is wired into image_batch; "
                                 "connect an IMAGE batch (e.g. Load Image) or choose a folder")
            folder = write_image_batch(image_batch, batch_captions(captions, image_batch.shape[0]))
            images = f"the image_batch of {image_batch.shape[0]}"
        else:
            folder = os.path.join(folder_paths.get_input_directory(), images)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"TDD Distill: the image folder '{images}' is not in ComfyUI's input "
                                        "directory; put a folder of images with .txt captions there and refresh (R) "
                                        "the node list")
        stem = lora_stem(lora_name)
        cfg = training_config(folder=folder, out="", run_dir="", method=method, preset=preset, steps=steps,
                              batch=batch, lr=lr, rank=rank, seed=seed, resolution=resolution,
                              gradient_checkpointing=gradient_checkpointing, precision=precision,
                              base_dtype=base_dtype, frames=frames)
        items, _ = data.scan(folder, warn=False)  # the trainer warns about bad files when it scans again
        comfy.model_management.load_models_gpu([model])  # the host applies the model's own patches first
        release_inference_tensors(model.model)
        teacher = models.from_components(model, clip, vae, name=type(model.model).__name__)
        res = cfg.resolution or teacher.native_resolution
        small = small_images(items, res)
        if small:
            h, w = small[0].size
            raise ValueError(f"TDD Distill: {len(small)} of {len(items)} images in {images!r} are smaller than the "
                             f"training resolution {res}px (e.g. {os.path.basename(small[0].path)}: {w}x{h}); set "
                             "resolution to at most their shorter side, or use larger images")
        fp = run_fingerprint(cfg, teacher, items)
        path, how = output_path(stem, fp, cfg.max_steps, overwrite)
        name = os.path.basename(path)
        run_dir = os.path.join(folder_paths.models_dir, RUNS_FOLDER, name[: -len(".safetensors")])
        if how != "reuse":
            cfg.out, cfg.run_dir = path, run_dir
            # encoded images and captions, computed once and shared by later runs (keyed by model, file, size)
            cfg.cache_dir = os.path.join(folder_paths.models_dir, RUNS_FOLDER, "cache")
            has_checkpoint = os.path.isfile(os.path.join(run_dir, "latest"))
            cfg.resume = run_dir if resume and has_checkpoint else None
            start = 0
            if cfg.resume:
                with open(os.path.join(run_dir, "latest")) as f:
                    start = int(f.read().strip().rsplit("-", 1)[-1])
            progress = _Progress(cfg.max_steps, start, cls.hidden.unique_id)
            result = trainer_module("loop").train(
                cfg, components=teacher, on_step=progress, on_calibration=progress.calibration,
                interrupts=(comfy.model_management.InterruptProcessingException,))
            if result["status"] != "done":
                log.warning("TDD Distill interrupted at step %d; checkpoint %s (queue again with resume on)",
                            result["step"], result["checkpoint"])
                raise comfy.model_management.InterruptProcessingException()  # ComfyUI: "interrupted", no outputs
        new_model, new_clip, loaded = lora_loader.load_tdd_lora(model, clip, path, 1.0, 1.0)
        settings = lora_settings.settings_for(model, path)
        losses = loss_history(run_dir) if os.path.isfile(os.path.join(run_dir, "log.csv")) else []
        what = {"reuse": "reused (this run had finished before)", "new": "trained", "overwrite": "trained (replaced)"}[how]
        info = f"{name}: {what}, {cfg.max_steps} steps; checkpoints in {run_dir}\n{loaded}\n{settings.describe()}"
        return io.NodeOutput(new_model, new_clip, load_file(path), {"loss": losses}, *settings.values(), info,
                             ui={"text": [info]})
