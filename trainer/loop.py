"""The training loop: optimiser and LR schedule, mixed precision, gradient accumulation, data
parallelism (torchrun: NCCL on GPU, gloo on CPU), logging, validation, checkpoints, SIGTERM.

Data parallelism: every process computes the same global batch (a function of the step) and takes
its own slice; each sample's random draws depend only on its global index
(:func:`trainer.algorithm.sample_generator`). Gradients of the LoRA parameters are averaged across
processes with one all-reduce per optimizer step - what DDP does, done by hand because the LoRA acts
through hooks on a frozen host model rather than as a module of its own. So N processes with batch
B/N follow the same trajectory as one process with batch B.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, data, models
from .algorithm import Cond, DiscreteSchedule, StepConfig, TargetSampler, compute_loss, draw_batch
from .config import ConfigError, TrainConfig, fingerprint
from .lora import LoRANetwork, enable_gradient_checkpointing
from .lora_format import atomic_save_safetensors, build_metadata

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Dist:
    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda and ":" not in device_pref else
                                   (device_pref if use_cuda else "cpu"))
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


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


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
        log.warning("received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name)
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
                rows = [r for r in csv.DictReader(f) if start_step and int(r["step"]) <= start_step]
            tmp = self.path.with_name("log.csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.FIELDS)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.path)
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
        self.w.writerow(r)
        self.f.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.tb.add_scalar(f"train/{k}", r[k], r["step"])

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _as_teacher(components, cfg, dtype, device) -> models.Teacher:
    if components is None:
        return models.load_teacher(cfg.teacher, dtype=dtype, device=str(device))
    if isinstance(components, models.Teacher):
        return components
    return models.from_components(*components[:3])


def _expand(c: Cond, n: int) -> Cond:
    return Cond(c.context.expand(n, *c.context.shape[1:]), None if c.y is None else c.y.expand(n, *c.y.shape[1:]))


def train(cfg: TrainConfig, components=None) -> dict:
    """Run (or resume) a distillation. ``components``: a :class:`trainer.models.Teacher` or a
    ``(model, clip, vae)`` triple to use instead of loading ``cfg.teacher``.

    Returns ``{"status": "done"|"interrupted", "step", "out", "checkpoint", "losses", "skipped_images"}``.
    """
    if components is not None and not cfg.teacher:
        cfg.teacher = "<components>"
    cfg.validate()
    ddp = Dist(cfg.device)
    try:
        return _train(cfg, components, ddp)
    finally:
        ddp.close()


def _train(cfg: TrainConfig, components, ddp: Dist) -> dict:
    device, rank, world = ddp.device, ddp.rank, ddp.world
    main = rank == 0
    models.ensure_host(str(device))
    precision = resolve_precision(cfg, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    items, bad = data.scan(cfg.data)  # before the (slow) teacher load: bad data fails fast
    teacher = _as_teacher(components, cfg, DTYPES[precision], device).to(device)
    resolution = cfg.resolution or teacher.native_resolution
    out_path = Path(cfg.out)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else out_path.with_name(out_path.stem + "_run")
    run_dir.mkdir(parents=True, exist_ok=True)

    td = data.TrainData(items, teacher, resolution, cfg.cache_dir, cfg.num_workers, skipped=len(bad))
    if main:
        log.info("teacher %s (%s, %s-prediction); %d images at %dpx (%d undecodable skipped); %d process(es)",
                 teacher.name, teacher.arch, teacher.prediction, len(items), resolution, len(bad), world)

    network = LoRANetwork(teacher.lora_targets(), cfg.rank, cfg.alpha, seed=cfg.seed).to(device).attach()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(teacher.checkpoint_blocks())
    params = list(network.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    fields = cfg.fingerprint_fields(world, data.dataset_id(items), teacher.fingerprint)
    fp = fingerprint(fields)
    global_batch = fields["global_batch"]

    step = 0
    if not cfg.resume and main and (run_dir / "latest").is_file():
        log.warning("%s holds checkpoints of an earlier run; this fresh run will replace them "
                    "(pass --resume %s to continue that run instead)", run_dir, run_dir)
    if cfg.resume:
        ckpt, lora_sd, state = checkpoint.load(cfg.resume, fp, fields)
        network.load_kohya_state_dict(lora_sd)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        step = int(state["step"])
        if state["samples_seen"] != step * global_batch:
            raise checkpoint.ResumeError(f"--resume {cfg.resume}: inconsistent data position in {ckpt}")
        if main:
            log.info("resumed from %s at step %d", ckpt, step)

    if cfg.cache_dir:
        td.precompute(rank, world)
        ddp.barrier()

    sampler = TargetSampler(cfg.method, cfg.kmin, cfg.kmax, cfg.eta_max)
    dsched = DiscreteSchedule(teacher.sigmas)
    step_cfg = StepConfig(cfg.method, cfg.teacher_guidance, cfg.loss, cfg.huber_c)
    ctx_e, pooled_e = teacher.encode_text([""])
    empty_cond = teacher.make_cond(ctx_e, pooled_e, resolution, resolution)
    uncond = teacher.uncond(ctx_e, pooled_e, resolution, resolution)
    autocast = (torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "fp32"
                else torch.autocast(device.type, enabled=False))

    def student(z, t, c):
        return teacher.x0(z, t, c)

    def frozen_teacher(z, t, c):
        with network.disabled():
            return teacher.x0(z, t, c)

    def run_info():
        return {"fingerprint": fp, "fingerprint_fields": fields, "config": asdict(cfg), "world_size": world,
                "base_arch": teacher.arch}

    def save_checkpoint() -> Path | None:
        path = None
        if main:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                     "rng": checkpoint.rng_state(), "step": step, "samples_seen": step * global_batch,
                     "fingerprint": fp}
            path = checkpoint.save(run_dir, step, network.kohya_state_dict(torch.float32), state, run_info(),
                                   cfg.keep_checkpoints)
        ddp.barrier()
        return path

    val_conds = None

    def validate():
        nonlocal val_conds
        from .validation import write_grid
        if val_conds is None:
            prompts = cfg.validation_prompts or [it.caption for it in items if it.caption][:2] or [""]
            ctx, pooled = teacher.encode_text(prompts)
            val_conds = [teacher.make_cond(ctx[i:i + 1], None if pooled is None else pooled[i:i + 1],
                                           resolution, resolution) for i in range(len(prompts))]
        write_grid(teacher, val_conds, latent_shape, run_dir / "validation" / f"step_{step:06d}.png",
                   seed=cfg.validation_seed)

    stop = _StopFlag().install()
    logger = _Log(run_dir, main, step)
    losses: list[float] = []
    latent_shape = None
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress), desc="tdd", unit="step")
    t_start = time.perf_counter()
    status, last_ckpt = "done", None
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            loss_acc = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                base = step * global_batch + (micro * world + rank) * cfg.batch_size
                gidx = list(range(base, base + cfg.batch_size))
                x0, ctx, pooled = td.fetch([data.global_order(cfg.seed, g, len(items)) for g in gidx])
                latent_shape = tuple(x0.shape[1:])
                draws = draw_batch(sampler, cfg.seed, gidx, latent_shape, cfg.empty_prompt_prob)
                cond = teacher.make_cond(ctx, pooled, resolution, resolution).where(draws.empty, empty_cond)
                with autocast:
                    loss = compute_loss(student, frozen_teacher, x0.to(device), cond, _expand(uncond, len(gidx)),
                                        draws, dsched, step_cfg)
                scaler.scale(loss / cfg.grad_accum).backward()
                loss_acc += loss.detach() / cfg.grad_accum
            if ddp.enabled:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = ddp.all_mean_(torch.cat([g.flatten() for g in grads]))
                for p, g in zip(params, torch.split(flat, [q.numel() for q in params])):
                    p.grad = g.view_as(p).clone()
                ddp.all_mean_(loss_acc)
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            step += 1
            loss_v = float(loss_acc)
            losses.append(loss_v)
            sps = global_batch / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4g}", lr=f"{lr:.2e}", sps=f"{sps:.2f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                logger.row(step=step, loss=loss_v, lr=lr, grad_norm=float(grad_norm), samples_per_s=sps,
                           elapsed_s=time.perf_counter() - t_start)
            stopping = ddp.any(stop.set)
            if stopping or step % cfg.save_every == 0:
                last_ckpt = save_checkpoint()
            if main and cfg.validate_every and step % cfg.validate_every == 0:
                validate()
            if stopping:
                status = "interrupted"
                if main:
                    log.warning("stopped at step %d; checkpoint %s; continue with --resume %s", step, last_ckpt, run_dir)
                break
        else:
            if step % cfg.save_every != 0:
                last_ckpt = save_checkpoint()
            if main:
                meta = build_metadata(base_arch=teacher.arch, method=cfg.method, kmin=cfg.kmin, kmax=cfg.kmax,
                                      training_steps=step, rank=cfg.rank, alpha=cfg.alpha,
                                      extra={"tdd_teacher": teacher.name, "tdd_resolution": resolution})
                atomic_save_safetensors(network.kohya_state_dict(DTYPES[cfg.save_dtype]), out_path, meta)
                log.info("wrote %s (%d LoRA modules, %d steps)", out_path, len(network.prefixes), step)
    finally:
        bar.close()
        logger.close()
        stop.restore()
        network.detach_hooks()
    return {"status": status, "step": step, "out": str(out_path) if status == "done" else None,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "losses": losses, "skipped_images": td.skipped,
            "run_dir": str(run_dir)}
