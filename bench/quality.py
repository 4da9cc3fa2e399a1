"""The TDD paper's claim, measured on the demo model: TDD vs TCD vs LCM students of one teacher.

    .venv/bin/python bench/quality.py --preset small      # make quality: <= 45 min on 2 cores
    .venv/bin/python bench/quality.py --preset full       # the committed docs/quality.md
    .venv/bin/python bench/quality.py --preset smoke      # a minute: every stage, tiny sizes

Stages (same code path for every preset; the presets change sizes only):

1. **train** one LoRA student per method with ``trainer/distill.py`` from the demo teacher
   (``nodes/demo_model.py:load_demo``) on the demo data set (``demo/dataset.py`` seed 0), all with
   the same budget: ``demo/distill_demo.toml``'s settings (lr schedule, rank, loss, seed) with the
   preset's steps x batch. Methods: ``tdd``, ``tcd``, ``lcm``, and ``tdd --adversarial`` when the
   trainer has that flag. Students are cached under ``.host/quality/`` by a fingerprint of their
   settings, the teacher weights, the data and the code that decides the weights
   (:data:`WEIGHT_CODE`), so re-runs skip training; each records the commit that trained it.
   ``--jobs 2`` (``make quality``) trains them two at a time in child processes, one core each.
2. **sample** through the real ComfyUI host loaded in this process, with the pack's and ComfyUI's
   nodes as a user wires them (SamplerCustomAdvanced; see :data:`RECIPES`): every student at 2, 4, 6
   and 8 steps with its method's recommended settings, the teacher alone at 2, 4, 8 and 25 euler
   steps at CFG 4.5, and the TDD student's guidance sweep at 4 steps. One fixed set of prompts
   (fresh scenes, seed 1000) and initial noises (seeds 1002 + chunk) for all; decoded by the VAE.
3. **read** every image with the attribute classifier (``demo/classifier.py``) and score it
   (``bench/quality_metrics.py``): attribute accuracy per attribute and mean, Frechet distance of
   classifier features against real images (seed 1001), teacher fidelity (feature distance to the
   teacher's 25-step image of the same prompt and noise), over-exposure; bootstrap 95% intervals.
4. **report**: every figure is logged; ``quality.md`` with the tables and PNG plots go to
   ``--out`` (``docs/`` for the full preset, ``out/quality_<preset>/`` otherwise).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Every operation here is small (8x8 latents, 128-d features): one thread each. On cores shared with
# other busy processes, multi-threaded BLAS/OpenMP calls wait for each other (measured here: a 128-d
# Frechet distance 40x slower with 2 BLAS threads than with 1). Set before numpy and torch load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
import quality_metrics as qm  # noqa: E402

log = logging.getLogger("bench.quality")

#: Students, run dirs, data and the bench's ComfyUI base dir (``TDD_QUALITY_WORK`` moves it; the
#: ``--jobs`` child processes inherit it).
WORK = Path(os.environ.get("TDD_QUALITY_WORK") or REPO / ".host" / "quality")
TRAIN_CONFIG = REPO / "demo" / "distill_demo.toml"
TEACHER_WEIGHTS = REPO / "demo" / "weights"
DATA_SEED = 0          # the students' training images (as demo/distill_demo.py)
PROMPT_SEED = 1000     # evaluation prompts: fresh scenes (the classifier trains on seeds 100/200, the demo on 0)
REAL_SEED = 1001       # real images for the Frechet distance
NOISE_SEED = 1002      # initial noise of chunk c: RandomNoise(NOISE_SEED + c)
STUDENT_STEPS = (2, 4, 6, 8)
TEACHER_STEPS = (2, 4, 8, 25)
TEACHER_CFG = 4.5
SWEEP_STEPS = 4
SWEEP_SCALES = (1.0, 1.5, 2.0, 3.0)
TDD_GUIDANCE = 1.7     # the TDD recipe's scale (the reference's SDXL setting)
GRID_STEPS = 4
GRID_COLUMNS = 8
CALIBRATION_PROMPTS = 32   # the full calibration (calibrate.FULL_PROMPTS), what the budget rule gives the full preset


@dataclass(frozen=True)
class Preset:
    train_steps: int
    batch: int
    warmup: int
    images: int       # training data set size
    samples: int      # evaluation prompts (= images per (method, steps))
    chunk: int        # images per sampler call
    n_boot: int       # bootstrap draws for the means
    fd_boot: int      # bootstrap draws for the Frechet distances (each one a 128-d matrix root)


PRESETS = {
    "smoke": Preset(train_steps=4, batch=4, warmup=2, images=32, samples=16, chunk=16, n_boot=50, fd_boot=20),
    "small": Preset(train_steps=250, batch=16, warmup=50, images=1000, samples=256, chunk=128, n_boot=500,
                    fd_boot=100),
    "full": Preset(train_steps=1200, batch=32, warmup=100, images=4000, samples=1024, chunk=128, n_boot=1000,
                   fd_boot=200),
}


@dataclass(frozen=True)
class Student:
    """One distillation method: its trainer flags and how it samples."""
    name: str
    label: str
    train_flags: tuple[str, ...]
    recipe: str          # key of RECIPES


STUDENTS = (
    Student("tdd", "TDD", ("--method", "tdd"), "tdd"),
    Student("tcd", "TCD", ("--method", "tcd"), "tcd"),
    Student("lcm", "LCM", ("--method", "lcm"), "lcm"),
)
ADVERSARIAL = Student("tdd_adv", "TDD + adversarial", ("--method", "tdd", "--adversarial"), "tdd")

#: Each method's recommended sampler settings, as the recipe builds them (for the report).
RECIPES = {
    "teacher": "teacher alone: BasicScheduler `normal` + KSamplerSelect `euler` + CFGGuider 4.5 (the demo "
               "workflow's teacher branch)",
    "tdd": "TDD Scheduler + TDD Sampler (eta 0.2) + TDD Guidance (scale 1.7 against the empty prompt): the "
           "TDD reference's SDXL setting",
    "tcd": "TCD's own schedule (diffusers `TCDScheduler` with its default original_inference_steps 50: "
           "999-759-499-259 at 4 steps) + TDD Sampler at eta 0.3 (TCD's gamma 0.3: the same step, s = floor(0.7 "
           "t_next)) + CFGGuider 1.0, i.e. no guidance: the TCD authors' model-card example (h1t/TCD-SD15-LoRA: "
           "TCDScheduler.from_config, guidance_scale 0, eta 0.3)",
    "lcm": "ModelSamplingDiscrete `lcm` + BasicScheduler `sgm_uniform` + KSamplerSelect `lcm` + CFGGuider 1.0 "
           "(ComfyUI's LCM recipe)",
}


def available_students() -> list[Student]:
    """The methods to compare: tdd, tcd, lcm, plus tdd --adversarial when the trainer has the flag."""
    from trainer.config import TrainConfig

    has_adv = any(f.name == "adversarial" for f in dataclasses.fields(TrainConfig))
    return list(STUDENTS) + ([ADVERSARIAL] if has_adv else [])


def tcd_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """TCD's inference timesteps: diffusers ``TCDScheduler.set_timesteps`` with its default
    ``original_inference_steps`` 50 (the TCD pipeline's): the skip grid ``k*i - 1`` (k = 1000 / 50),
    reversed, at ``floor(linspace(0, 50, steps, endpoint=False))`` (4 steps: 999, 759, 499, 259)."""
    k = num_train_timesteps // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return [int(t) for t in grid[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(int)]]


# ------------------------------------------------------------------------------------------------
# stage 1: train
# ------------------------------------------------------------------------------------------------

def file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def train_argv(student: Student, preset: Preset) -> list[str]:
    """The trainer flags every student shares (the budget; calibration is the bench's own stage, see
    :func:`calibrate_student`), then the method's own."""
    return ["--config", str(TRAIN_CONFIG), "--max-steps", str(preset.train_steps), "--batch-size",
            str(preset.batch), "--warmup-steps", str(preset.warmup), "--validate-every", "0",
            "--save-every", str(max(preset.train_steps // 4, 1)), "--no-calibrate", *student.train_flags]


#: The maths that decides a student's weights: its digest is part of the cache key, so a change to
#: the objective, the LoRA or the schedules retrains every student. The rest of trainer/ (CLI,
#: checkpoint files, data-fault handling, calibration, the model seam's loading code, whose
#: conversions the tests pin) can change without retraining; ``--retrain`` forces it.
WEIGHT_CODE = ("trainer/algorithm.py", "trainer/lora.py", "trainer/flow.py", "trainer/adversarial.py",
               "tdd_core/schedules.py", "tdd_core/spaces.py")


def student_key(student: Student, preset: Preset) -> str:
    """Cache key: the trainer flags, the TOML, the teacher weights, the data set size and the code that
    decides the weights (:data:`WEIGHT_CODE`)."""
    blob = json.dumps({"argv": train_argv(student, preset), "toml": TRAIN_CONFIG.read_text(),
                       "teacher": file_digest(TEACHER_WEIGHTS.glob("*.safetensors")), "images": preset.images,
                       "data_seed": DATA_SEED, "code": file_digest(REPO / f for f in WEIGHT_CODE)})
    return f"{student.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when it has changes), recorded with each student."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "trainer", "tdd_core"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_data(preset: Preset) -> Path:
    from demo.distill_demo import write_dataset

    return write_dataset(WORK / f"data_{preset.images}", preset.images, seed=DATA_SEED)


def train_student(student: Student, preset: Preset, data: Path, retrain: bool = False) -> tuple[Path, dict]:
    """The student's LoRA under .host/quality/students (trained now unless cached) and its record."""
    from trainer import distill

    key = student_key(student, preset)
    out = WORK / "students" / f"{key}.safetensors"
    record_path = out.with_suffix(".json")
    if out.is_file() and record_path.is_file() and not retrain:
        record = {**json.loads(record_path.read_text()), "cached": True}
        log.info("%s: cached student %s (trained in %.0f s)", student.label, out.name, record["train_seconds"])
        return out, record
    run_dir = WORK / "runs" / key
    argv = [*train_argv(student, preset), "--data", str(data), "--out", str(out), "--run-dir", str(run_dir),
            "--cache-dir", str(WORK / "latent_cache"), "--overwrite"]  # (the bench owns its students' files)
    resumed = (run_dir / "latest").is_file() and not retrain
    if resumed:
        argv += ["--resume", str(run_dir)]
    log.info("%s: training %d steps x batch %d: trainer/distill.py %s", student.label, preset.train_steps,
             preset.batch, " ".join(argv))
    start, cpu = time.perf_counter(), time.process_time()
    status = distill.main(argv)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if status != 0 or not out.is_file():
        raise RuntimeError(f"training the {student.label} student failed (exit status {status}); see the log above")
    logged = training_seconds(run_dir)
    record = {"method": student.name, "argv": argv, "train_seconds": logged if resumed and logged else seconds,
              "train_cpu_seconds": cpu, "resumed": resumed, "trained_at_commit": git_commit()}
    record_path.write_text(json.dumps(record, indent=1))
    log.info("%s: trained in %.0f s -> %s", student.label, seconds, out)
    return out, {**record, "cached": False}


def training_seconds(run_dir: Path) -> float | None:
    """Wall seconds of training behind a run's ``log.csv``, summed over its segments: ``elapsed_s``
    restarts whenever the run is resumed (a long preset may span several sessions), and a resumed log
    keeps its rows up to the checkpoint it resumed from, so work lost to an interruption is not
    counted. None without a log."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return None
    total = last = 0.0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            elapsed = float(row["elapsed_s"])
            if elapsed < last:
                total += last
            last = elapsed
    return total + last


def calibrate_student(path: Path, data: Path, criterion: str) -> tuple[Path, dict]:
    """The TDD student's calibrated copy, made as the trainer calibrates at the end of a run
    (``trainer/calibrate.py``: the data's captions with fresh noises, :data:`CALIBRATION_PROMPTS` of
    them, the run's seed and teacher guidance), at every step count of the bench; cached by criterion."""
    import contextlib
    import tomllib

    import torch

    from trainer import calibrate
    from trainer.data import scan
    from trainer.models import load_teacher

    out = path.with_name(f"{path.stem}_calibrated_{criterion.replace('+', '_')}.safetensors")
    record_path = out.with_suffix(".json")
    if out.is_file() and record_path.is_file():
        return out, {**json.loads(record_path.read_text()), "cached": True}
    settings = tomllib.loads(TRAIN_CONFIG.read_text())
    teacher = load_teacher(settings["teacher"], dtype=torch.float32, device="cpu")
    captions = calibrate.held_out_captions([it.caption for it in scan(data)[0]], CALIBRATION_PROMPTS,
                                           settings["seed"])
    start, cpu = time.perf_counter(), time.process_time()
    result = calibrate.calibrate_lora(
        teacher, lambda on: teacher.lora_file_applied(path) if on else contextlib.nullcontext(), captions,
        settings["resolution"], method="tdd", kmin=settings["kmin"], kmax=settings["kmax"], seed=settings["seed"],
        criterion=criterion, reference_guidance=1.0 + settings["teacher_guidance"], steps=STUDENT_STEPS)
    calibrate.recalibrated_copy(path, out, result)
    record = {"criterion": criterion, "prompts": result.prompts, "seconds": time.perf_counter() - start,
              "cpu_seconds": time.process_time() - cpu, "settings_scored": len(result.scores),
              "best": {str(k): [b.guidance, b.eta] for k, b in sorted(result.best.items())},
              "summary": result.summary()}
    record_path.write_text(json.dumps(record, indent=1))
    log.info("calibrated %s in %.0f s: %s", path.name, record["seconds"], result.summary())
    return out, {**record, "cached": False}


# ------------------------------------------------------------------------------------------------
# stage 2: sample through the in-process ComfyUI host
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompts:
    scenes: list
    captions: list[str]


def eval_prompts(n: int) -> Prompts:
    from demo import dataset

    scenes = [dataset.sample(PROMPT_SEED, i)[2] for i in range(n)]
    return Prompts(scenes, [s.caption for s in scenes])


class Host:
    """The demo teacher inside ComfyUI loaded in this process, and node calls on it."""

    def __init__(self, base_dir: Path = WORK / "comfy_base"):
        import harness

        self.harness = harness
        self.nodes = harness.inprocess_host(base_dir)
        self.loras = Path(base_dir) / "models" / "loras" / "quality"
        self.model, self.clip, self.vae = self.run("TDDDemoCheckpointLoader", weights="shipped (demo/weights)")
        self.empty = self.run("CLIPTextEncode", clip=self.clip, text="")[0]
        self._host_helpers = sys.modules[harness.pack_module().__name__ + ".nodes._host"]

    def run(self, node: str, **inputs):
        """One node call, in inference mode as ComfyUI's executor runs every prompt."""
        import torch

        with torch.inference_mode():
            return self.harness.run_node(self.nodes, node, **inputs)

    def encode(self, captions: list[str]):
        """One CONDITIONING for a batch of prompts: each caption encoded by CLIPTextEncode, stacked along
        the batch (item k of the latent batch gets prompt k)."""
        import torch

        conds = [self.run("CLIPTextEncode", clip=self.clip, text=c)[0][0] for c in captions]
        extras = {}
        with torch.inference_mode():
            for key in conds[0][1]:
                values = [c[1][key] for c in conds]
                extras[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
            return [[torch.cat([c[0] for c in conds]), extras]]

    def with_lora(self, path: Path):
        """The teacher with a student LoRA (stock LoraLoaderModelOnly at strength 1)."""
        self.loras.mkdir(parents=True, exist_ok=True)
        if not (self.loras / path.name).exists():  # a copy where ComfyUI's LoRA loaders look
            shutil.copyfile(path, self.loras / path.name)
        return self.run("LoraLoaderModelOnly", model=self.model, lora_name=f"quality/{path.name}",
                        strength_model=1.0)[0]

    def tcd_sigmas(self, model, steps: int):
        import torch

        ms = model.get_model_object("model_sampling")
        return torch.tensor([self._host_helpers.sigma_at_timestep(ms, t) for t in tcd_timesteps(steps)] + [0.0])

    # -- recipes: (guider, sampler, sigmas) for a positive conditioning ---------------------------
    def recipe(self, kind: str, model, steps: int, positive, guidance: float | None = None,
               eta: float | None = None):
        if kind == "teacher":
            cfg = TEACHER_CFG if guidance is None else guidance
            return (self.run("CFGGuider", model=model, positive=positive, negative=self.empty, cfg=cfg)[0],
                    self.run("KSamplerSelect", sampler_name="euler")[0],
                    self.run("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=1.0)[0])
        if kind == "tdd":
            scale = TDD_GUIDANCE if guidance is None else guidance
            return (self.run("TDDGuidance", model=model, positive=positive, negative=self.empty, scale=scale,
                             guidance_start=0.0, guidance_end=1.0, rescale=0.0)[0],
                    self.run("TDDSampler", eta=0.2 if eta is None else eta, x0_clip_steps=0)[0],
                    self.run("TDDScheduler", model=model, steps=steps, non_equidistant=False, denoise=1.0)[0])
        if kind == "tcd":
            return (self.run("CFGGuider", model=model, positive=positive, negative=self.empty, cfg=1.0)[0],
                    self.run("TDDSampler", eta=0.3, x0_clip_steps=0)[0], self.tcd_sigmas(model, steps))
        if kind == "lcm":
            lcm_model = self.run("ModelSamplingDiscrete", model=model, sampling="lcm", zsnr=False)[0]
            return (self.run("CFGGuider", model=lcm_model, positive=positive, negative=self.empty, cfg=1.0)[0],
                    self.run("KSamplerSelect", sampler_name="lcm")[0],
                    self.run("BasicScheduler", model=lcm_model, scheduler="sgm_uniform", steps=steps, denoise=1.0)[0])
        raise ValueError(f"unknown recipe {kind!r}")

    def encode_chunks(self, captions: list[str], chunk: int) -> list:
        """:meth:`encode` of ``captions`` in batches of ``chunk`` (one sampler call each)."""
        return [self.encode(captions[i:i + chunk]) for i in range(0, len(captions), chunk)]

    def generate(self, kind: str, model, steps: int, chunks: list, guidance: float | None = None,
                 eta: float | None = None) -> np.ndarray:
        """uint8 ``(N, 64, 64, 3)`` images (SaveImage's conversion) for the conditioned chunks; chunk c
        starts from RandomNoise(NOISE_SEED + c)."""
        out = []
        for c, positive in enumerate(chunks):
            batch = positive[0][0].shape[0]
            latent = self.run("EmptyLatentImage", width=64, height=64, batch_size=batch)[0]
            noise = self.run("RandomNoise", noise_seed=NOISE_SEED + c)[0]
            guider, sampler, sigmas = self.recipe(kind, model, steps, positive, guidance, eta)
            samples = self.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                               latent_image=latent)[0]
            images = self.run("VAEDecode", samples=samples, vae=self.vae)[0]
            out.append(np.clip(255.0 * images.cpu().numpy(), 0, 255).astype(np.uint8))
        return np.concatenate(out)


@dataclass
class Run:
    """One (method, steps[, guidance]) configuration's images and how long they took."""
    method: str
    label: str
    steps: int
    guidance: float | None
    images: np.ndarray
    seconds: float
    metrics: dict = field(default_factory=dict)
    eta: float | None = None


def sample_all(host: Host, students: dict, prompts: Prompts, preset: Preset,
               calibrated: dict[str, list[float]] | None = None) -> list[Run]:
    """The teacher baselines, every student at every step count, the TDD guidance sweep, and the TDD
    student again with the settings its calibration chose per step count (``calibrated``: steps ->
    [guidance, eta])."""
    chunks = host.encode_chunks(prompts.captions, preset.chunk)
    plan = [("teacher", "teacher", "teacher", host.model, s, None, None) for s in TEACHER_STEPS]
    for student, (model, _) in students.items():
        plan += [(student.name, student.label, student.recipe, model, s, None, None) for s in STUDENT_STEPS]
    if "tdd" in {s.name for s in students}:
        tdd_model = next(m for s, (m, _) in students.items() if s.name == "tdd")
        plan += [("tdd_sweep", "TDD", "tdd", tdd_model, SWEEP_STEPS, g, None) for g in SWEEP_SCALES]
        for steps, (g, e) in sorted((calibrated or {}).items(), key=lambda kv: int(kv[0])):
            plan.append(("tdd_cal", "TDD, calibrated", "tdd", tdd_model, int(steps), g, e))
    runs = []
    for k, (name, label, kind, model, steps, guidance, eta) in enumerate(plan, 1):
        start = clock()
        images = host.generate(kind, model, steps, chunks, guidance, eta)
        wall, cpu = clock() - start
        runs.append(Run(name, label, steps, guidance, images, wall, eta=eta))
        log.info("[%d/%d] sampled %-18s %2d steps%s%s: %d images in %.1f s (CPU %.1f s)", k, len(plan), label, steps,
                 "" if guidance is None else f" guidance {guidance}", "" if eta is None else f" eta {eta}",
                 len(images), wall, cpu)
    return runs


# ------------------------------------------------------------------------------------------------
# stage 3: read and score
# ------------------------------------------------------------------------------------------------

def score(runs: list[Run], prompts: Prompts, preset: Preset) -> dict:
    """Fill each run's metrics; -> the reference figures (real images, teacher 25 steps)."""
    from demo import classifier, dataset

    net = classifier.load()
    labels = {k: v.numpy() for k, v in classifier.labels(prompts.scenes).items()}
    n = len(prompts.scenes)
    real_prompted = np.stack([dataset.sample(PROMPT_SEED, i)[0] for i in range(n)])
    real_feats = real_features(net, n)
    teacher25 = next(r for r in runs if r.method == "teacher" and r.steps == max(TEACHER_STEPS))
    _, teacher_feats = classifier.read(net, teacher25.images)
    reference = {"real images of the prompts": score_images(net, real_prompted, labels, real_feats, None, preset)}
    for r in runs:
        r.metrics = score_images(net, r.images, labels, real_feats, teacher_feats, preset)
    return reference


def real_features(net, n: int) -> np.ndarray:
    """The classifier's features of ``n`` real dataset images (seed ``REAL_SEED``): the Frechet reference."""
    from demo import classifier, dataset

    return classifier.read(net, np.stack([dataset.sample(REAL_SEED, i)[0] for i in range(n)]))[1]


def accuracy(net, images, labels, n_boot: int) -> tuple[dict, np.ndarray]:
    """The classifier's accuracy on ``images`` per attribute and their mean (bootstrap estimates), and
    its features of the images."""
    from demo import classifier

    preds, feats = classifier.read(net, images)
    hits = qm.attribute_hits(preds, labels)
    out = {name: qm.bootstrap_ci(h, n_boot, seed=0) for name, h in hits.items()}
    out["mean"] = qm.bootstrap_ci(qm.mean_hits(hits), n_boot, seed=0)
    return out, feats


def score_images(net, images, labels, real_feats, teacher_feats, preset: Preset) -> dict:
    out, feats = accuracy(net, images, labels, preset.n_boot)
    out["fd"] = qm.bootstrap_fd_ci(feats, real_feats, n_boot=preset.fd_boot, seed=0)
    if teacher_feats is not None:
        out["fidelity"] = qm.bootstrap_ci(qm.pair_distances(feats, teacher_feats), preset.n_boot, seed=0)
    out["saturated"] = qm.bootstrap_ci(qm.saturated_per_image(images), preset.n_boot, seed=0)
    out["saturation"] = qm.bootstrap_ci(qm.saturation_per_image(images), preset.n_boot, seed=0)
    return out


# ------------------------------------------------------------------------------------------------
# stage 4: report
# ------------------------------------------------------------------------------------------------

def pct(e: qm.Estimate) -> str:
    return f"{100 * e.value:.1f} [{100 * e.lo:.1f}, {100 * e.hi:.1f}]"


def num(e: qm.Estimate, digits: int = 2) -> str:
    return f"{e.value:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}]"


def main_rows(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.method != "tdd_sweep"]


def sweep_runs(runs: list[Run]) -> list[Run]:
    """The TDD student at the sweep's step count: the sweep scales and the recommended one, by scale."""
    rs = [r for r in runs if r.method == "tdd_sweep" or (r.method == "tdd" and r.steps == SWEEP_STEPS)]
    return sorted(rs, key=lambda r: TDD_GUIDANCE if r.guidance is None else r.guidance)


def compare(runs: list[Run], steps: int, subject: str = "tdd") -> list[str]:
    """Plain statements of the ``subject`` row (the TDD student, or it calibrated) against each other
    method at ``steps`` (mean accuracy; 'ahead'/'behind' only when the 95% intervals do not overlap)."""
    at = {r.method: r for r in main_rows(runs) if r.steps == steps and r.method not in ("teacher",)}
    if subject not in at:
        return []
    mine, lines = at[subject].metrics["mean"], []
    for name, r in at.items():
        if name == subject:
            continue
        other = r.metrics["mean"]
        verdict = ("ahead of" if mine.lo > other.hi else "behind" if mine.hi < other.lo else
                   "not separable from (intervals overlap)")
        lines.append(f"at {steps} steps {at[subject].label} ({pct(mine)}) is {verdict} {r.label} ({pct(other)})")
    return lines


def log_figures(runs: list[Run], reference: dict) -> None:
    attrs = [k for k in reference["real images of the prompts"] if k not in ("mean", "fd", "saturated", "saturation")]
    log.info("%-22s %5s %5s  %-22s %-22s %-22s %s", "method", "steps", "guid", "mean accuracy %",
             "FD vs real", "teacher fidelity", "  ".join(attrs))
    for name, m in reference.items():
        log.info("%-22s %5s %5s  %-22s %-22s", name, "-", "-", pct(m["mean"]), num(m["fd"], 1))
    for r in runs:
        m = r.metrics
        log.info("%-22s %5d %5s  %-22s %-22s %-22s %s  saturated px %s  HSV saturation %s", r.label, r.steps,
                 "-" if r.guidance is None else r.guidance, pct(m["mean"]), num(m["fd"], 1), num(m["fidelity"]),
                 "  ".join(f"{100 * m[a].value:.1f}" for a in attrs), pct(m["saturated"]), num(m["saturation"]))


def write_plots(runs: list[Run], prompts: Prompts, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = {"steps": folder / "metrics_vs_steps.png", "grid": folder / f"samples_{GRID_STEPS}_steps.png",
             "sweep": folder / "guidance_sweep.png"}
    methods = list(dict.fromkeys((r.method, r.label) for r in main_rows(runs)))
    panels = [("mean", "mean attribute accuracy (%)", 100), ("fd", "Frechet distance to real (classifier features)", 1),
              ("fidelity", "feature distance to teacher 25 steps", 1)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (key, title, scale) in zip(axes, panels):
        for name, label in methods:
            rs = sorted((r for r in main_rows(runs) if r.method == name), key=lambda r: r.steps)
            x = [r.steps for r in rs]
            y = np.array([[r.metrics[key].value, r.metrics[key].lo, r.metrics[key].hi] for r in rs]) * scale
            style = dict(ls="--", color="black") if name == "teacher" else {}
            ax.errorbar(x, y[:, 0], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], marker="o", capsize=3,
                        label=label if name != "teacher" else "teacher (euler, CFG 4.5)", **style)
        ax.set_xscale("log")
        ax.minorticks_off()
        ticks = sorted({*STUDENT_STEPS, *TEACHER_STEPS})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("sampling steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Students of one demo teacher, same training budget (95% bootstrap intervals)", fontsize=11)
    fig.tight_layout()
    fig.savefig(files["steps"], dpi=110)
    plt.close(fig)

    rows = [r for r in main_rows(runs)
            if r.steps == GRID_STEPS or (r.method == "teacher" and r.steps == max(TEACHER_STEPS))]
    rows.sort(key=lambda r: (r.method != "teacher", -r.steps if r.method == "teacher" else 0))
    cols = min(GRID_COLUMNS, len(prompts.captions))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols + 1.6, 1.55 * len(rows) + 0.8), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(r.images[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{r.label}\n{r.steps} steps", fontsize=8)
            if i == 0:
                ax.set_title("\n".join(wrap(prompts.captions[j], 22)), fontsize=6)
    fig.suptitle(f"{GRID_STEPS}-step samples per method (same prompts and initial noise), teacher at 25 steps on top",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(files["grid"], dpi=110)
    plt.close(fig)

    sweep = sweep_runs(runs)
    teacher25 = next(r for r in runs if r.method == "teacher" and r.steps == max(TEACHER_STEPS))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title, scale) in zip(axes, [("mean", "mean attribute accuracy (%)", 100),
                                              ("saturated", "saturated pixels (%)", 100),
                                              ("saturation", "mean HSV saturation", 1)]):
        if sweep:
            g = [TDD_GUIDANCE if r.guidance is None else r.guidance for r in sweep]
            y = np.array([[r.metrics[key].value, r.metrics[key].lo, r.metrics[key].hi] for r in sweep]) * scale
            ax.errorbar(g, y[:, 0], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], marker="o", capsize=3,
                        label=f"TDD student, {SWEEP_STEPS} steps")
        ax.axhline(teacher25.metrics[key].value * scale, color="black", ls="--", label="teacher, 25 steps, CFG 4.5")
        ax.set_xlabel("TDD Guidance scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["sweep"], dpi=110)
    plt.close(fig)
    return files


def wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def side_note(record: dict) -> str:
    """The cost table's note for a student trained by one of ``--jobs`` child processes."""
    jobs = record.get("side_by_side")
    return f" (trained {jobs} at a time, one core each)" if jobs else ""


def write_doc(path: Path, runs, reference, records, plots, preset_name: str, preset: Preset, students,
              timings: dict, calibration: dict | None = None) -> None:
    attrs = [k for k in reference["real images of the prompts"] if k not in ("mean", "fd", "saturated", "saturation")]
    rel = {k: os.path.relpath(v, path.parent) for k, v in plots.items()}
    lines = [
        "# Quality: TDD vs TCD vs LCM students of the demo teacher",
        "",
        f"Written by `bench/quality.py --preset {preset_name}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} CPU threads). Do not edit by hand: re-run the bench. "
        "The instrument, its metrics and the sampling recipes are described in the script's docstring.",
        "",
        "## Setup",
        "",
        "- **Teacher**: the demo model (`nodes/demo_model.py:load_demo`, `demo/weights`); the students are its "
        "LoRAs from `trainer/distill.py`.",
        f"- **Training budget, identical for every method**: {preset.train_steps} steps x batch {preset.batch} "
        f"on {preset.images} images of `demo/dataset.py` (seed {DATA_SEED}); the other settings from "
        f"`demo/distill_demo.toml` (lr schedule `warmup` with {preset.warmup} warm-up steps, rank, alpha, loss, seed).",
        "- **Methods**: " + ", ".join(f"{s.label} (`{' '.join(s.train_flags)}`)" for s in students) + ".",
        f"- **Evaluation**: {preset.samples} fresh prompts (scenes of seed {PROMPT_SEED}), the same initial noises "
        f"for every configuration (RandomNoise seed {NOISE_SEED} + chunk of {preset.chunk}); students at "
        f"{', '.join(map(str, STUDENT_STEPS))} steps, the teacher at {', '.join(map(str, TEACHER_STEPS))}; "
        "sampled in ComfyUI (in-process) and decoded by the demo VAE.",
        "- **Sampler settings** (each method's recommended ones):",
        *[f"  - {k}: {v}" for k, v in RECIPES.items()],
        "- **Metrics** (`bench/quality_metrics.py`), read by the attribute classifier `demo/classifier.py`: "
        "accuracy = the classifier reads the attribute the prompt asked for; FD = Frechet distance of its "
        f"128-d features to {preset.samples} real images (seed {REAL_SEED}); teacher fidelity = mean feature "
        "distance to the teacher's 25-step image of the same prompt and noise; saturated px = pixels with a "
        "channel <= 2 or >= 253. Brackets: 95% percentile-bootstrap intervals over prompts (FD: both sets "
        "resampled).",
        "",
        "## Results",
        "",
        f"![metrics vs steps]({rel['steps']})",
        "",
        "| method | steps | mean accuracy % | FD to real | teacher fidelity | saturated px % |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in reference.items():
        lines.append(f"| {name} (reference) | - | {pct(m['mean'])} | {num(m['fd'], 1)} | - | {pct(m['saturated'])} |")
    for r in main_rows(runs):
        m = r.metrics
        lines.append(f"| {r.label} | {r.steps} | {pct(m['mean'])} | {num(m['fd'], 1)} | {num(m['fidelity'])} | "
                     f"{pct(m['saturated'])} |")
    lines += ["", "The real-image FD row is the floor at this sample size (two independent real sets). FD intervals "
              "sit mostly above the estimate: resampling with replacement repeats images, which inflates a Frechet "
              "distance, so the percentile interval is shifted up (it is widened to include the estimate).", "",
              "### Accuracy per attribute (%)", "",
              "| method | steps | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs)]
    for name, m in reference.items():
        lines.append(f"| {name} | - | " + " | ".join(pct(m[a]) for a in attrs) + " |")
    for r in main_rows(runs):
        lines.append(f"| {r.label} | {r.steps} | " + " | ".join(pct(r.metrics[a]) for a in attrs) + " |")
    lines += ["", "### TDD against the other methods (mean accuracy)", ""]
    lines += [f"- {s}" for steps in STUDENT_STEPS for s in compare(runs, steps)] or ["- (no TDD student in this run)"]
    cal_runs = sorted((r for r in runs if r.method == "tdd_cal"), key=lambda r: r.steps)
    if cal_runs:
        rec = calibration or {}
        lines += ["", "### TDD, calibrated", "",
                  f"The same TDD student sampled with the settings its calibration chose (`trainer/calibrate.py`, "
                  f"criterion `{rec.get('criterion')}`, {rec.get('prompts')} prompts of its training captions with "
                  f"fresh noises, the distance to the teacher's 25-step image; {rec.get('settings_scored')} settings "
                  f"scored in {rec.get('seconds', float('nan')) / 60:.1f} min), the same TDD Scheduler and Sampler, "
                  "TDD Guidance against the empty prompt:", "",
                  "| steps | guidance | eta |", "|---|---|---|",
                  *[f"| {r.steps} | {r.guidance:g} | {r.eta:g} |" for r in cal_runs], ""]
        lines += [f"- {s}" for steps in STUDENT_STEPS for s in compare(runs, steps, "tdd_cal")]
    teacher25 = next(r for r in runs if r.method == "teacher" and r.steps == max(TEACHER_STEPS))
    lines += ["", f"## TDD guidance sweep at {SWEEP_STEPS} steps", "", f"![guidance sweep]({rel['sweep']})", "",
              "| guidance | mean accuracy % | saturated px % | mean HSV saturation | FD to real |",
              "|---|---|---|---|---|",
              f"| teacher 25 steps, CFG {TEACHER_CFG} | {pct(teacher25.metrics['mean'])} | "
              f"{pct(teacher25.metrics['saturated'])} | {num(teacher25.metrics['saturation'], 3)} | "
              f"{num(teacher25.metrics['fd'], 1)} |"]
    for r in sweep_runs(runs):
        m = r.metrics
        scale = f"{TDD_GUIDANCE} (recommended)" if r.guidance is None else r.guidance
        lines.append(f"| {scale} | {pct(m['mean'])} | {pct(m['saturated'])} | {num(m['saturation'], 3)} | "
                     f"{num(m['fd'], 1)} |")
    lines += ["", f"## Samples at {GRID_STEPS} steps", "", f"![samples]({rel['grid']})", "",
              "## Cost", "", "Wall time, and the CPU time of this process (what it costs on cores it has to itself, "
              "one thread).", "", "| stage | wall time | CPU time |", "|---|---|---|"]
    for s, rec in records.items():
        lines.append(f"| train {s.label} ({preset.train_steps} x {preset.batch}) | "
                     f"{rec['train_seconds'] / 60:.1f} min | {rec.get('train_cpu_seconds', float('nan')) / 60:.1f} min"
                     f"{' (cached: an earlier run)' if rec.get('cached') else ''}"
                     f"{side_note(rec)}"
                     f"{' (resumed: wall time summed over its sessions, CPU time of the last)' if rec.get('resumed') else ''} |")
    if calibration:
        lines.append(f"| calibrate TDD ({calibration['prompts']} prompts, {calibration['settings_scored']} settings) | "
                     f"{calibration['seconds'] / 60:.1f} min | {calibration['cpu_seconds'] / 60:.1f} min"
                     f"{' (cached: an earlier run)' if calibration.get('cached') else ''} |")
    lines += [f"| {k} | {wall / 60:.1f} min | {cpu / 60:.1f} min |" for k, (wall, cpu) in timings.items()]
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--out", help="folder for quality.md and quality/*.png (default: docs for the full preset, "
                                  "else out/quality_<preset>)")
    ap.add_argument("--retrain", action="store_true", help="train the students again even when cached")
    ap.add_argument("--samples", type=int, help="override the preset's number of evaluation prompts")
    ap.add_argument("--train-steps", type=int, help="override the preset's training steps")
    ap.add_argument("--methods", help="comma-separated subset of the students (names: tdd, tcd, lcm, tdd_adv): "
                                      "with --train-only, to train students side by side, one process per core; "
                                      "else the report compares only these")
    ap.add_argument("--criterion", default=None,
                    help="calibration criterion for the 'TDD, calibrated' row (default: the trainer's; 'none' "
                         "leaves the row out)")
    ap.add_argument("--train-only", action="store_true",
                    help="train (or find cached) the students, then stop: no sampling, scoring or report")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train the students in this many processes side by side (one thread each; 2 on 2 "
                         "cores halves the training stage), then sample them all in this one")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1; 0: torch's choice). The demo model's operations are too "
                         "small to gain from threads, and on cores shared with other busy processes the threads "
                         "of one operation wait for each other: a training step took 25x longer with 2 threads "
                         "than with 1 here")
    return ap.parse_args(argv)


def select_students(students: list[Student], methods: str | None) -> list[Student]:
    """The students named in ``methods`` (comma-separated), in the bench's order; all when None."""
    if not methods:
        return students
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    known = {s.name for s in students}
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return [s for s in students if s.name in wanted]


def share_out(students: list[Student], jobs: int) -> list[list[Student]]:
    """The students dealt round-robin to ``jobs`` training processes (no empty share)."""
    return [share for share in (students[i::jobs] for i in range(max(jobs, 1))) if share]


def train_side_by_side(students: list[Student], args) -> None:
    """Train the students in ``args.jobs`` child processes (``--train-only --methods <share>``), each
    writing its own log next to the run dirs; the students land in the cache this run then reads."""
    procs = []
    for share in share_out(students, args.jobs):
        names = ",".join(s.name for s in share)
        argv = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--train-only",
                "--methods", names, "--threads", str(args.threads)]
        if args.train_steps:
            argv += ["--train-steps", str(args.train_steps)]
        if args.retrain:
            argv.append("--retrain")
        log_path = WORK / f"train_{args.preset}_{names.replace(',', '_')}.log"
        log.info("training %s in a child process (log: %s)", names, log_path)
        with open(log_path, "w") as f:
            procs.append((names, log_path, subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)))
    failed = [(names, path) for names, path, proc in procs if proc.wait() != 0]
    if failed:
        raise RuntimeError("training failed for " + "; ".join(f"{n} (see {p})" for n, p in failed))


def resolve_preset(args) -> Preset:
    preset = PRESETS[args.preset]
    if args.samples:
        preset = dataclasses.replace(preset, samples=args.samples)
    if args.train_steps:
        preset = dataclasses.replace(preset, train_steps=args.train_steps)
    if preset.samples < 2:
        raise SystemExit("--samples must be at least 2 (a covariance needs two images)")
    return preset


def clock() -> np.ndarray:
    """(wall seconds, this process's CPU seconds) now; differences of two are durations."""
    return np.array([time.perf_counter(), time.process_time()])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.criterion is None:
        from trainer.calibrate import DEFAULT_CRITERION
        args.criterion = DEFAULT_CRITERION
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preset = resolve_preset(args)
    students = select_students(available_students(), args.methods)  # an unknown name fails before the host loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    default_out = REPO / "docs" if args.preset == "full" else REPO / "out" / f"quality_{args.preset}"
    out = Path(args.out) if args.out else default_out
    t0 = clock()
    host = Host()  # before the trainer imports comfy: the in-process host owns ComfyUI's set-up
    log.info("preset %s: %s; methods: %s", args.preset, preset, ", ".join(s.label for s in students))
    data = write_data(preset)
    records, models = {}, {}
    retrain, side_by_side = args.retrain, args.jobs > 1 and not args.train_only and len(students) > 1
    if side_by_side:
        train_side_by_side(students, args)
        retrain = False  # the children just trained them
    for s in students:
        path, records[s] = train_student(s, preset, data, retrain)
        if side_by_side:
            records[s] = {**records[s], "cached": False, "side_by_side": args.jobs}
        models[s] = (host.with_lora(path), path)
    if args.train_only:
        log.info("trained: %s", ", ".join(f"{s.label} ({records[s]['train_seconds'] / 60:.1f} min)" for s in students))
        return 0
    calibration = None
    tdd = next((s for s in students if s.name == "tdd"), None)
    if tdd is not None and args.criterion != "none":
        _, calibration = calibrate_student(models[tdd][1], data, args.criterion)
    t_sample = clock()
    prompts = eval_prompts(preset.samples)
    runs = sample_all(host, models, prompts, preset, calibration and calibration["best"])
    t_score = clock()
    reference = score(runs, prompts, preset)
    log_figures(runs, reference)
    for steps in STUDENT_STEPS:
        for line in compare(runs, steps) + compare(runs, steps, "tdd_cal"):
            log.info("%s", line)
    plots = write_plots(runs, prompts, out / "quality")
    t_end = clock()
    timings = {"sampling (all configurations)": t_score - t_sample, "scoring and plots": t_end - t_score,
               "whole bench, this run": t_end - t0}
    write_doc(out / "quality.md", runs, reference, records, plots, args.preset, preset, students, timings,
              calibration)
    for k, (wall, cpu) in timings.items():
        log.info("%s: %.1f min wall, %.1f min CPU", k, wall / 60, cpu / 60)
    log.info("wrote %s and %s", out / "quality.md", ", ".join(str(p) for p in plots.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
