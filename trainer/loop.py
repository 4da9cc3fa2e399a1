"""The training loop: optimiser and LR schedule, mixed precision, gradient accumulation, data
parallelism (torchrun: NCCL on GPU, gloo on CPU), a sharded frozen base (``--fsdp``), logging,
validation, checkpoints, SIGTERM.

Data parallelism: every process computes the same global batch (a function of the step) and takes
its own slice; each sample's random draws depend only on its global index
(:func:`trainer.algorithm.sample_generator`). Gradients of the LoRA parameters are averaged across
processes with one all-reduce per optimizer step - what DDP does, done by hand because the LoRA acts
through hooks on a frozen host model rather than as a module of its own. So N processes with batch
B/N follow the same trajectory as one process with batch B.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from . import adversarial, calibrate, checkpoint, data, guards, memory, models
from .algorithm import (StepConfig, TargetSampler, compute_loss, draw_batch, loss_fn,
                        prediction_and_target)
from .config import ConfigError, TrainConfig, fingerprint
from .fileio import DiskFullError, atomic_path, describe_disk, fsync_path, is_disk_full, remove_stale_temps
from .lora import LoRANetwork, enable_gradient_checkpointing
from .lora_format import atomic_save_safetensors, build_metadata, read_header_metadata

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          **({"fp8": torch.float8_e4m3fn} if hasattr(torch, "float8_e4m3fn") else {})}


def available_memory(device: torch.device) -> int:
    """Bytes a run may use on ``device``: the GPU's total memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil
    return int(psutil.virtual_memory().total)


def pick_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """The device a run uses for ``--device`` (``auto``: this process's GPU when there is one, else CPU)."""
    use_cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{local_rank}" if use_cuda and ":" not in device_pref else
                        (device_pref if use_cuda else "cpu"))


class Dist:
    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(device_pref, self.local_rank)
        use_cuda = self.device.type == "cuda"
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if use_cuda else "gloo")

    def all_mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
            t /= self.world
        return t

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def lr_lambda(cfg: TrainConfig):
    warm = max(0, cfg.warmup_steps)

    def f(step: int) -> float:
        if cfg.lr_schedule != "constant" and warm and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            progress = (step - warm) / max(1, cfg.max_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def resolve_precision(cfg: TrainConfig, device: torch.device, bf16_supported: bool | None = None) -> tuple[str, str]:
    """-> (autocast dtype, frozen-base storage dtype). ``auto`` follows the reference (docs/method.md §5.3):
    on a GPU fp32 frozen weights under bf16 autocast (fp16 where the GPU lacks bf16); on CPU fp32 throughout."""
    compute, base = cfg.precision, cfg.base_dtype
    if compute == "auto":
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
            compute = "bf16" if ok else "fp16"
        else:
            compute = "fp32"
    if base == "auto":
        base = "fp32"
    if device.type != "cuda" and "fp16" in (compute, base):
        raise ConfigError("fp16 (--precision or --base-dtype) needs a GPU; use bf16 or fp32 on CPU")
    if base == "fp8" and (device.type != "cuda" or not hasattr(torch, "float8_e4m3fn")):
        raise ConfigError("--base-dtype fp8 needs a GPU and a torch with float8 support; use bf16 to save memory")
    return compute, base


def shard_frozen_base(teacher) -> tuple[int, int]:
    """``--fsdp``: FSDP2's ``fully_shard`` on the frozen base, so each process stores 1/N of its weights
    and gathers one block's at a time (forward, and backward for the gradients that flow through it).
    The units are the family's blocks (:meth:`trainer.models.Teacher.checkpoint_blocks`, those gradient
    checkpointing wraps), the diffusion model is the root. The LoRA stays outside (its hooks run inside
    the gathered block) and its gradients are averaged as without. -> (parameters, parameters per process)."""
    from torch.distributed.fsdp import fully_shard

    root = teacher.model.diffusion_model
    total = sum(p.numel() for p in root.parameters())
    for block in teacher.checkpoint_blocks():
        if next(block.parameters(), None) is not None:
            fully_shard(block)
    fully_shard(root)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in root.parameters())
    return total, local


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and returns at the next step boundary."""

    def __init__(self):
        self.set, self._old = False, {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("received %s: saving a checkpoint and stopping after this step (during calibration: at "
                    "the next model evaluation)", signal.Signals(signum).name)
        self.set = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Log:
    FIELDS = ["step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"]

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.path = run_dir / "log.csv"
        if self.path.exists():  # a fresh run starts a fresh log; a resumed one drops rows after its checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if start_step and _logged_step(r) in range(1, start_step + 1)]
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.FIELDS)
                w.writeheader()
                w.writerows(rows)
        new = not self.path.exists()
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.FIELDS)
        if new:
            self.w.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def row(self, **r):
        if not self.enabled:
            return
        try:
            self.w.writerow(r)
            self.f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(self.path, e) from e
            raise
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.tb.add_scalar(f"train/{k}", r[k], r["step"])

    def sync(self):
        """The rows so far on disk (before a checkpoint: a power loss can't leave the log behind it)."""
        if self.enabled:
            fsync_path(self.path)

    def close(self):
        if self.enabled:
            try:
                self.f.close()
            except OSError as e:  # a row the full disk refused: already reported as DiskFullError
                log.debug("log.csv: %s", e)
            if self.tb is not None:
                self.tb.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.1f} h"


def _logged_step(row: dict) -> int:
    """A log.csv row's step, or 0 for a row a kill cut short (never kept)."""
    try:
        if any(row.get(k) in (None, "") for k in _Log.FIELDS):
            return 0
        return int(row["step"])
    except ValueError:
        return 0


def _as_teacher(components, cfg, dtype, device) -> models.Teacher:
    if components is None:
        return models.load_teacher(cfg.teacher, dtype=dtype, device=str(device), unet=cfg.unet, clip=cfg.clip,
                                   vae=cfg.vae)
    if isinstance(components, models.Teacher):
        return components
    return models.from_components(*components[:3])


def train(cfg: TrainConfig, components=None, on_step=None, interrupts: tuple = (), on_calibration=None) -> dict:
    """Run (or resume) a distillation. ``components``: a :class:`trainer.models.Teacher` or a
    ``(model, clip, vae)`` triple to use instead of loading ``cfg.teacher``. ``on_step(run, row)``
    is called after every optimizer step with the log row (progress for a host such as ComfyUI);
    it may call ``run.request_stop()``: the run then checkpoints and returns "interrupted" as on SIGTERM.
    ``on_calibration(run, done, total)``: calibration's progress in model evaluations (it may call
    ``run.request_stop()`` too: calibration stops at the next evaluation, the LoRA is not written, and
    a resume calibrates and writes it).
    ``interrupts``: exception types a host raises inside the model to cancel at once (ComfyUI checks
    its Cancel flag in every layer): the step in progress is dropped and the last completed one is
    checkpointed, so a resume continues exactly.

    Returns ``{"status": "done"|"interrupted", "step", "out", "checkpoint", "losses", "skipped_images"}``.
    A write that fails because the disk is full raises :class:`trainer.fileio.DiskFullError` whose message
    names the file, the last good checkpoint and how to continue.
    """
    if components is not None and not cfg.teacher:
        cfg.teacher = "<components>"
    cfg.validate()
    ddp = Dist(cfg.device)
    cfg.world_size = ddp.world
    cfg.resolve_accumulation()
    try:
        run = Run(cfg, components, ddp)
        run.on_step, run.on_calibration, run.interrupts = on_step, on_calibration, tuple(interrupts)
        try:
            run.resume()
            return run.run()
        except DiskFullError as e:
            raise run.disk_full(e) from e
        finally:
            run.close()
    finally:
        ddp.close()


class Run:
    """One distillation run, in named stages: :meth:`__init__` (setup), :meth:`resume`,
    :meth:`train_step` (one optimizer step), :meth:`validate`, :meth:`finish`; :meth:`run` drives them."""

    # ---- setup -------------------------------------------------------------------------------
    def __init__(self, cfg: TrainConfig, components, ddp: Dist):
        self.cfg, self.ddp = cfg, ddp
        self.device, self.main = ddp.device, ddp.rank == 0
        models.ensure_host(str(self.device))
        self.precision, self.base_dtype = resolve_precision(cfg, self.device)
        self.out_path = Path(cfg.out)
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else self.out_path.with_name(self.out_path.stem + "_run")
        # before the (slow) teacher load: bad data and an --out that isn't ours fail fast
        self.items, self.bad_files = data.scan(cfg.data, strict=cfg.strict_data, workers=max(1, cfg.num_workers))
        self._refuse_foreign_out()
        self.teacher = teacher = _as_teacher(components, cfg, DTYPES[self.base_dtype], self.device).to(self.device)
        # unset loss/lr/... take the family's defaults (FLUX: §5.1)
        cfg.apply_family_defaults(teacher.arch, teacher.row.defaults, teacher.flow)
        warning = guards.lr_samples_warning(cfg.lr, cfg.global_batch, cfg.max_steps)
        if warning and self.main:
            log.warning("%s", warning)
        if cfg.adversarial and teacher.arch not in adversarial.ARCHES:
            raise ConfigError(f"--adversarial supports SD1.5, SD2.x and SDXL teachers, not {teacher.arch} "
                              f"({teacher.name}): drop --adversarial to distil this model with plain TDD")
        self.resolution = cfg.resolution or teacher.native_resolution
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:  # what a process killed mid-write left (never read: loaders open final names only)
            for p in remove_stale_temps(self.run_dir) + remove_stale_temps(self.out_path.parent, {self.out_path.name}):
                log.info("removed %s, left by a process killed while writing it", p)
        self.data = data.TrainData(self.items, teacher, self.resolution, cfg.cache_dir, cfg.num_workers,
                                   skipped=len(self.bad_files), seed=cfg.seed, center_crop=cfg.center_crop,
                                   frames=cfg.frames)
        if self.main:
            log.info("teacher %s (%s, %s-prediction); %d images at %dpx (%d undecodable skipped); %d process(es)",
                     teacher.name, teacher.arch, teacher.prediction, len(self.items), self.resolution,
                     len(self.bad_files), ddp.world)
        self.network = LoRANetwork(teacher.lora_targets(), cfg.rank, cfg.alpha, seed=cfg.seed).to(self.device).attach()
        self._check_fits()  # before the first step: a clear error naming the option to try
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(teacher.checkpoint_blocks())
        self.params = list(self.network.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.disc = self.disc_opt = None
        if cfg.adversarial:  # docs/method.md §5.2: frozen teacher features (LoRA off) + trainable heads
            self.disc = adversarial.Discriminator(teacher, self.network, seed=cfg.seed)
            self.disc_params = list(self.disc.heads.parameters())
            self.disc_opt = torch.optim.AdamW(self.disc_params, lr=cfg.adv_lr, betas=adversarial.HEAD_BETAS,
                                              weight_decay=adversarial.HEAD_WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.fields = cfg.fingerprint_fields(data.dataset_id(self.items), teacher.fingerprint,
                                             (self.precision, self.base_dtype), teacher.embedded_guidance)
        self.fp = fingerprint(self.fields)
        self.sharded = self._shard() if cfg.fsdp else False
        self.sampler = TargetSampler(cfg.method, cfg.kmin, cfg.kmax, cfg.eta_max)
        self.dsched = teacher.schedule(cfg)  # the family's noise levels and teacher step
        self.step_cfg = StepConfig(cfg.method, cfg.teacher_guidance, cfg.loss, cfg.huber_c)
        self.empty_text = teacher.encode_text([""])
        self.autocast = (torch.autocast(self.device.type, dtype=DTYPES[self.precision]) if self.precision != "fp32"
                         else torch.autocast(self.device.type, enabled=False))
        self.step, self.losses, self.latent_shape, self.val_conds = 0, [], None, None
        self.stop, self.logger, self.bar = _StopFlag(), None, None
        self.on_step, self.on_calibration, self.interrupts = None, None, ()

    def _shard(self) -> bool:
        """``--fsdp``: shard the frozen base (after the teacher's fingerprint, which reads its weights)."""
        if not self.ddp.enabled:
            raise ConfigError("--fsdp shards the frozen model over several processes: run the trainer under "
                              "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
        total, local = shard_frozen_base(self.teacher)
        if self.main:
            log.info("--fsdp: the frozen base is sharded over %d processes: %.1f M of its %.1f M parameters in "
                     "each", self.ddp.world, local / 1e6, total / 1e6)
        return True

    def _check_fits(self) -> None:
        """Refuse a run whose memory estimate (trainer/memory.py, from the model's parameter counts)
        exceeds the device's memory, naming the option that would make it fit."""
        cfg, teacher = self.cfg, self.teacher
        size = teacher.model_size(self.resolution, cfg.frames,
                                  lora_params=sum(p.numel() for p in self.network.parameters()))
        problem = memory.fit_problem(teacher.arch, size, available_memory(self.device), batch=cfg.batch_size,
                                     resolution=self.resolution, base_dtype=self.base_dtype,
                                     checkpointing=cfg.gradient_checkpointing, rank=cfg.rank, device=str(self.device))
        if problem:
            raise ConfigError(problem)

    def request_stop(self) -> None:
        """Stop at this step's end with a checkpoint, as SIGTERM does (a host's Cancel button)."""
        self.stop.set = True

    def _refuse_foreign_out(self) -> None:
        """Refuse to start when ``--out`` holds a LoRA of another run (unless ``--overwrite``): the resumed
        run's own output (same run fingerprint as the checkpoint) may be replaced. Decided by the main process
        (the only one that writes) and shared, so every process stops alike."""
        problem = self._foreign_out_problem() if self.main and not self.cfg.overwrite else None
        if self.ddp.any(problem is not None):
            raise ConfigError(problem or f"--out {self.out_path} is refused by the main process (see its log)")

    def _foreign_out_problem(self) -> str | None:
        out, cfg = self.out_path, self.cfg
        if not out.exists():
            return None
        try:
            own = checkpoint.fingerprint_of(cfg.resume) if cfg.resume else None
        except checkpoint.ResumeError:  # reported by resume() itself, alike on every process
            own = None
        try:
            theirs = read_header_metadata(out).get("tdd_run_fingerprint")
        except (OSError, ValueError):
            theirs = None
        if own is not None and theirs == own:
            return None
        whose = f"a LoRA of another run (run fingerprint {theirs})" if theirs else "a file this run did not write"
        return (f"--out {out} already exists and is {whose}; this run won't replace it: pass --overwrite to "
                "replace it, or choose another --out")

    def disk_full(self, e: DiskFullError) -> DiskFullError:
        """``e`` with what to do: the last good checkpoint, the LoRA at --out left as it was, how to continue."""
        last = checkpoint.latest(self.run_dir)
        kept = (f"the last good checkpoint is {last} (step {int(last.name.rsplit('-', 1)[1])})" if last
                else "there is no checkpoint yet")
        out = f"; {self.out_path} is untouched" if self.out_path.exists() and e.path != self.out_path else ""
        how = f"continue with --resume {self.run_dir}" if last else "start the run again"
        return DiskFullError(e.path, e.cause, f"{e}{' (' + str(e.cause) + ')' if e.cause else ''}. Nothing is lost: "
                             f"{kept}{out}. Free space ({describe_disk(e.path)} now; a checkpoint needs about "
                             f"{self._checkpoint_bytes() / 2 ** 20:.1f} MB), then {how}")

    def _checkpoint_bytes(self) -> int:
        last = checkpoint.latest(self.run_dir)
        return sum(f.stat().st_size for f in last.iterdir()) if last else 0

    # ---- resume ------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from ``--resume`` (LoRA, optimiser, schedule, scaler, RNG, data position); fill the cache."""
        cfg = self.cfg
        if not cfg.resume and self.main and (self.run_dir / "latest").is_file():
            log.warning("%s holds checkpoints of an earlier run; this fresh run will replace them "
                        "(pass --resume %s to continue that run instead)", self.run_dir, self.run_dir)
        if cfg.resume:
            ckpt, lora_sd, state = checkpoint.load(cfg.resume, self.fp, self.fields)
            self.network.load_kohya_state_dict(lora_sd)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.disc is not None:
                self.disc.heads.load_state_dict(state["discriminator"])
                self.disc_opt.load_state_dict(state["disc_optimizer"])
            checkpoint.set_rng_state(state["rng"])
            self.step = int(state["step"])
            if state["samples_seen"] != self.step * cfg.global_batch:
                raise checkpoint.ResumeError(f"--resume {cfg.resume}: inconsistent data position in {ckpt}")
            if self.main:
                log.info("resumed from %s at step %d", ckpt, self.step)
        if cfg.cache_dir:
            self.data.precompute(self.ddp.rank, self.ddp.world)
            self.ddp.barrier()

    # ---- one step ----------------------------------------------------------------------------
    def _student(self, z, t, c):
        return self.teacher.x0(z, t, c)

    def _frozen_teacher(self, z, t, c):
        with self.network.disabled():
            return self.teacher.x0(z, t, c)

    def micro_batch(self, micro: int) -> torch.Tensor:
        """Loss of this process's slice of micro-batch ``micro`` of the current global batch (backward done)."""
        cfg, ddp = self.cfg, self.ddp
        base = self.step * cfg.global_batch + (micro * ddp.world + ddp.rank) * cfg.batch_size
        gidx = list(range(base, base + cfg.batch_size))
        x0, ctx, pooled, geometry = self.data.fetch([data.global_order(cfg.seed, g, len(self.items)) for g in gidx],
                                                    gidx)
        self.latent_shape = tuple(x0.shape[1:])
        draws = draw_batch(self.sampler, cfg.seed, gidx, self.latent_shape, cfg.empty_prompt_prob)
        res, n = self.resolution, len(gidx)
        ctx_e, pooled_e = (None if v is None else v.expand(n, *v.shape[1:]) for v in self.empty_text)
        ctx, ctx_e = data.same_length(ctx, ctx_e)  # text encoders of variable length (not CLIP's 77)
        cond = self.teacher.make_cond(ctx, pooled, res, res, geometry).where(
            draws.empty, self.teacher.make_cond(ctx_e, pooled_e, res, res, geometry))
        uncond = self.teacher.uncond(ctx_e, pooled_e, res, res, geometry)
        args = (self._student, self._frozen_teacher, x0.to(self.device), cond, uncond, draws, self.dsched,
                self.step_cfg)
        with self.autocast:
            loss = compute_loss(*args) if self.disc is None else self._adversarial_loss(args, gidx)
        self.scaler.scale(loss / cfg.grad_accum).backward()
        return loss.detach()

    def _adversarial_loss(self, args, gidx) -> torch.Tensor:
        """docs/method.md §5.2: on a discriminator step the heads' hinge loss (no student gradients); on a
        student step the consistency loss + ``adv_weight`` x the generator hinge term."""
        cfg, dev = self.cfg, self.device
        d_step = adversarial.is_discriminator_step(self.step)
        with torch.set_grad_enabled(not d_step):
            pred, target = prediction_and_target(*args)
        cond, draws = args[3], args[5]
        t_gan, n_fake, n_real = adversarial.draw_gan(cfg.seed, gidx, draws.s, pred.shape[1:])
        s, t_gan = draws.s.to(dev), t_gan.to(dev)
        fake = adversarial.renoise(pred, s, t_gan, n_fake.to(dev, pred.dtype), self.dsched)
        real = adversarial.renoise(target, s, t_gan, n_real.to(dev, pred.dtype), self.dsched)
        if d_step:
            return self.disc.d_loss(fake, real, t_gan, cond)
        return loss_fn(pred, target, cfg.loss, cfg.huber_c) + cfg.adv_weight * self.disc.g_loss(fake, t_gan, cond)

    def _all_reduce_grads(self, params) -> None:
        """Average the gradients of ``params`` over processes (one all-reduce; what DDP does)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.ddp.all_mean_(torch.cat([g.flatten() for g in grads]))
        for p, g in zip(params, torch.split(flat, [q.numel() for q in params])):
            p.grad = g.view_as(p).clone()

    def train_step(self) -> dict:
        """One optimizer step over the global batch; -> the log row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss_acc = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            loss_acc += self.micro_batch(micro) / cfg.grad_accum
        # the adversarial variant's even steps update the discriminator heads, odd ones the LoRA
        d_step = self.disc is not None and adversarial.is_discriminator_step(self.step)
        params, opt = (self.disc_params, self.disc_opt) if d_step else (self.params, self.opt)
        if self.ddp.enabled:
            self._all_reduce_grads(params)
            self.ddp.all_mean_(loss_acc)
        self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        for o in (self.opt, self.disc_opt):
            if o is not None:  # the generator term also left gradients on the heads: drop them
                o.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]
        with warnings.catch_warnings():
            # the LoRA's schedule follows the global step count, discriminator steps included; torch
            # warns when a scheduler steps before its optimizer has, as on the variant's first step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.sched.step()
        self.step += 1
        loss_v = float(loss_acc)
        self.losses.append(loss_v)
        return {"step": self.step, "loss": loss_v, "lr": lr, "grad_norm": float(grad_norm),
                "samples_per_s": cfg.global_batch / max(time.perf_counter() - t0, 1e-9)}

    # ---- checkpoints and validation ----------------------------------------------------------
    def save_checkpoint(self, rng: dict | None = None) -> Path | None:
        path = None
        if self.main:
            state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rng or checkpoint.rng_state(), "step": self.step,
                     "samples_seen": self.step * self.cfg.global_batch, "fingerprint": self.fp}
            if self.disc is not None:
                state.update(discriminator=self.disc.heads.state_dict(), disc_optimizer=self.disc_opt.state_dict())
            info = {"fingerprint": self.fp, "fingerprint_fields": self.fields, "config": asdict(self.cfg),
                    "world_size": self.ddp.world, "base_arch": self.teacher.arch,
                    **self.skipped_summary()}
            if self.logger is not None:
                self.logger.sync()
            path = checkpoint.save(self.run_dir, self.step, self.network.kohya_state_dict(torch.float32), state, info,
                                   self.cfg.keep_checkpoints)
        self.ddp.barrier()
        return path

    def skipped_files(self) -> list[data.BadFile]:
        """The training images left out: found bad at scan time, or failing to decode later."""
        later = [data.BadFile(self.items[i].path, "failed to decode during training") for i in sorted(self.data.bad)]
        return self.bad_files + later

    def skipped_summary(self) -> dict:
        """``skipped_files`` (how many) and ``skipped_names`` (the first ones, relative to --data) for run.json
        and, as ``tdd_skipped_*``, the LoRA's metadata."""
        bad = self.skipped_files()
        root = Path(self.cfg.data)
        root = root if root.is_dir() else root.parent
        names = [os.path.relpath(b.path, root) for b in bad[:data.SHOWN_BAD]]
        return {"skipped_files": len(bad), "skipped_names": names}

    def validate(self) -> None:
        """A 4- and 8-step grid of the student for the validation prompts (main process)."""
        from .validation import write_grid
        cfg, teacher, res = self.cfg, self.teacher, self.resolution
        if self.val_conds is None:
            prompts = cfg.validation_prompts or [it.caption for it in self.items if it.caption][:2] or [""]
            ctx, pooled = teacher.encode_text(prompts)
            self.val_conds = [teacher.make_cond(ctx[i:i + 1], None if pooled is None else pooled[i:i + 1], res, res)
                              for i in range(len(prompts))]
        write_grid(teacher, self.val_conds, self.latent_shape,
                   self.run_dir / "validation" / f"step_{self.step:06d}.png", seed=cfg.validation_seed,
                   write=self.main)

    # ---- finish ------------------------------------------------------------------------------
    def reference_guidance(self) -> float:
        """The guidance of calibration's teacher reference: CFG 1 + --teacher-guidance; FLUX its embedding's."""
        teacher = self.teacher
        return teacher.default_reference_guidance() if teacher.embedded_guidance else 1.0 + self.cfg.teacher_guidance

    def calibration_plan(self) -> calibrate.Plan:
        """What calibration will cost: the budget rule (:func:`trainer.calibrate.plan_for_run`) on the whole
        run's training samples (steps x global batch, so a resumed run plans as an uninterrupted one)."""
        cfg = self.cfg
        return calibrate.plan_for_run(
            calibrate.guidance_family(self.teacher), cfg.method, cfg.kmin, cfg.kmax, cfg.max_steps * cfg.global_batch,
            self.reference_guidance(), fraction=cfg.calibrate_budget, prompts=cfg.calibrate_prompts,
            steps=tuple(cfg.calibrate_steps) if cfg.calibrate_steps else None)

    def _announce(self, plan: calibrate.Plan, seconds_per_step: float | None) -> None:
        """The cost line, before calibration starts: evaluations, why, and a time at this run's speed."""
        cfg = self.cfg
        per_eval = (seconds_per_step / (cfg.batch_size * cfg.grad_accum * calibrate.TRAIN_EVALS_PER_SAMPLE)
                    if seconds_per_step else None)
        when = (f"about {_duration(plan.evaluations * per_eval)} at this run's training speed "
                f"({_duration(seconds_per_step)} per step)" if per_eval else
                "no training step was timed in this process, so no time estimate (the progress bar shows the rate)")
        log.info("calibrating (%s): %s, %s; %s. Stop with Ctrl-C/SIGTERM: the checkpoint is kept and --resume %s "
                 "calibrates again", plan.level, plan.describe(), plan.reason, when, self.run_dir)

    def calibration(self, seconds_per_step: float | None = None) -> calibrate.Calibration | None:
        """The recommended sampler settings of the trained LoRA, measured (trainer/calibrate.py): the
        data's captions with fresh noises, the student (LoRA on) against the teacher (LoRA off), at
        the cost the budget rule allows. A stop request (:meth:`request_stop`, SIGTERM) raises
        :class:`trainer.calibrate.CalibrationStopped` at the next model evaluation."""
        cfg, teacher = self.cfg, self.teacher
        if not cfg.calibrate:
            return None
        plan = self.calibration_plan()
        if self.main:
            self._announce(plan, seconds_per_step)
        captions = calibrate.held_out_captions([it.caption for it in self.items], plan.prompts, cfg.seed)
        host = None if self.on_calibration is None else (lambda done, total: self.on_calibration(self, done, total))
        # sharded: every process must stop at the same evaluation (each is collective), so they agree first
        stop = (lambda: self.ddp.any(self.stop.set)) if self.sharded else (lambda: self.stop.set)
        with calibrate.progress_bar(plan.evaluations, not (cfg.progress and self.main), host) as progress, \
                self.autocast:
            return calibrate.calibrate_lora(
                teacher, lambda on: contextlib.nullcontext() if on else self.network.disabled(), captions,
                self.resolution, method=cfg.method, kmin=cfg.kmin, kmax=cfg.kmax, seed=cfg.seed,
                criterion=cfg.calibrate_criterion, reference_guidance=self.reference_guidance(), plan=plan,
                monitor=calibrate.Monitor(plan.evaluations, progress, stop), frames=cfg.frames)

    def finish(self, run_seconds: float | None = None, seconds_per_step: float | None = None) -> None:
        """Calibrate, then write the output LoRA (kohya keys, ``tdd_*`` metadata) on the main process
        (with a sharded base every process calibrates alike, since each model call is collective)."""
        if not (self.main or self.sharded):
            return
        cfg, teacher = self.cfg, self.teacher
        cal = self.calibration(seconds_per_step)
        if not self.main:
            return
        extra = {}
        if cal is not None:
            cal.run_seconds = run_seconds
            extra = cal.metadata()
            if cal.fraction_of_run is not None:
                log.info("calibration took %.0f s, %.1f%% of this run's training time", cal.seconds,
                         100 * cal.fraction_of_run)
        meta = build_metadata(base_arch=teacher.arch, method=cfg.method, kmin=cfg.kmin, kmax=cfg.kmax,
                              training_steps=self.step, rank=cfg.rank, alpha=cfg.alpha,
                              embedded_guidance=teacher.embedded_guidance,
                              extra={"tdd_teacher": teacher.name, "tdd_resolution": self.resolution,
                                     "tdd_guidance_kind": "embedding" if teacher.embedded_guidance else "cfg",
                                     **({"tdd_frames": cfg.frames} if cfg.frames != 1 else {}),
                                     **{f"tdd_{k}": json.dumps(v) for k, v in self.skipped_summary().items()},
                                     "tdd_run_fingerprint": self.fp,
                                     **({"tdd_method": f"{cfg.method}-adv"} if cfg.adversarial else {}), **extra})
        atomic_save_safetensors(teacher.lora_file_keys(self.network.kohya_state_dict(DTYPES[cfg.save_dtype])),
                                self.out_path, meta)
        log.info("wrote %s (%d LoRA modules, %d steps)", self.out_path, len(self.network.prefixes), self.step)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm.auto import tqdm
        cfg = self.cfg
        self.stop.install()
        self.logger = _Log(self.run_dir, self.main, self.step)
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.main and cfg.progress), desc="tdd",
                        unit="step")
        t_start, first_step = time.perf_counter(), self.step
        status, last_ckpt = "done", None
        while self.step < cfg.max_steps:
            rng_at_start = checkpoint.rng_state() if self.interrupts else None
            try:
                with self.teacher.training():  # the host's training mode (differentiable kernels)
                    row = self.train_step()
            except self.interrupts as e:  # the host cancelled mid-step: keep the last completed step
                for o in (self.opt, self.disc_opt):
                    if o is not None:
                        o.zero_grad(set_to_none=True)
                status, last_ckpt = "interrupted", self.save_checkpoint(rng=rng_at_start)
                log.warning("cancelled (%s) during step %d; checkpoint %s of step %d", type(e).__name__,
                            self.step + 1, last_ckpt, self.step)
                break
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}", sps=f"{row['samples_per_s']:.2f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.logger.row(**row, elapsed_s=time.perf_counter() - t_start)
            if self.on_step is not None:
                self.on_step(self, row)
            stopping = self.ddp.any(self.stop.set)
            if stopping or self.step % cfg.save_every == 0:
                last_ckpt = self.save_checkpoint()
            if (self.main or self.sharded) and cfg.validate_every and self.step % cfg.validate_every == 0:
                self.validate()  # (sharded: every process samples, its forwards are collective; rank 0 writes)
            if stopping:
                status = "interrupted"
                if self.main:
                    log.warning("stopped at step %d; checkpoint %s; continue with --resume %s", self.step, last_ckpt,
                                self.run_dir)
                break
        else:
            if self.step % cfg.save_every != 0:
                last_ckpt = self.save_checkpoint()
            seconds = time.perf_counter() - t_start
            try:
                self.finish(seconds, seconds / (self.step - first_step) if self.step > first_step else None)
            except (calibrate.CalibrationStopped, *self.interrupts) as e:
                # stopped while calibrating: the checkpoint holds every step
                status, last_ckpt = "interrupted", last_ckpt or checkpoint.latest(self.run_dir)
                if self.main:
                    how = ("stopped" if isinstance(e, calibrate.CalibrationStopped)
                           else f"cancelled ({type(e).__name__})")
                    log.warning("%s while calibrating (%s); no LoRA written; checkpoint %s of step %d. Continue with "
                                "--resume %s: it calibrates and writes the LoRA", how, e, last_ckpt, self.step,
                                self.run_dir)
        return {"status": status, "step": self.step, "out": str(self.out_path) if status == "done" else None,
                "checkpoint": str(last_ckpt) if last_ckpt else None, "losses": self.losses,
                "skipped_images": self.data.skipped, "run_dir": str(self.run_dir)}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
        self.stop.restore()
        self.network.detach_hooks()
