"""The trainer under faults, on the tiny model (CPU): nothing lost.

- kill -9 at seeded random moments (training steps, checkpoint writes, the LoRA write, the cache, timers),
  each run resumed until done: the same LoRA and loss history as an uninterrupted run, at most one step
  of work lost per kill, never a partial file where a loader reads;
- a full disk (a real size-limited tmpfs where the system allows one, and an injected ENOSPC): one clear
  error, the last good checkpoint and an earlier LoRA intact, an exact resume once space is freed;
- bad data (corrupt, truncated, empty, not an image, a caption that is not UTF-8): skipped with one
  warning each and counted in the LoRA's metadata, or refused up front with --strict-data; the order of
  the rest is the same in every process;
- an existing --out of another run is not replaced without --overwrite; a resume refuses a checkpoint
  whose result-changing settings differ, naming exactly those.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import trainer_fixtures as fx

from trainer import checkpoint
from trainer.lora_format import read_header_metadata

pytestmark = pytest.mark.usefixtures("trainer_host")

PY, REPO = sys.executable, fx.REPO
TEMP = re.compile(r"^\..+\.(tmp|old)-\d+$")


def loads(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fx_train(data, tmp, components, **kw):
    from trainer.loop import train

    return train(fx.train_config(data, tmp, **kw), components=components)


def log_rows(run_dir) -> list[tuple[int, float]]:
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def temps(*folders) -> list[Path]:
    """What atomic writes and removals left under temporary names (never read by a loader)."""
    return sorted(p for d in folders if Path(d).is_dir() for p in Path(d).iterdir() if TEMP.match(p.name))


def assert_loadable(tmp: Path, max_steps: int) -> int:
    """Everything a loader would open in ``tmp`` is complete: the LoRA at --out, ``latest`` and every
    checkpoint folder, the latent cache, log.csv (steps 1..m, each once). -> the step ``latest`` names."""
    out, run_dir = tmp / "lora.safetensors", tmp / "run"
    if out.exists():
        assert loads(out) and int(read_header_metadata(out)["tdd_training_steps"]) == max_steps
    for step, ckpt in checkpoint.checkpoints(run_dir, complete=False).items():
        assert loads(ckpt / "lora.safetensors"), ckpt
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        assert state["step"] == step and json.loads((ckpt / "run.json").read_text())["fingerprint"]
    for record in (tmp / "cache").glob("*.safetensors"):
        assert {"mean", "logvar", "context"} <= set(loads(record))
    steps = [s for s, _ in log_rows(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), steps
    if (run_dir / "latest").exists():
        latest = checkpoint.latest(run_dir)
        assert latest is not None, (run_dir / "latest").read_text()
        return int(latest.name.split("-")[1])
    return 0


# ------------------------------------------------------------------------------------------------
# kill -9
# ------------------------------------------------------------------------------------------------
class Zygote:
    """``tests/fault_zygote.py`` in a subprocess: forks one training attempt per request."""

    def __init__(self, log_path: Path):
        self.stderr = open(log_path, "w")
        self.proc = subprocess.Popen([PY, str(REPO / "tests" / "fault_zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=fx.subprocess_env(),
                                     cwd=log_path.parent)
        ready = json.loads(self.proc.stdout.readline() or "{}")
        assert ready.get("ready"), log_path.read_text()[-3000:]

    def attempt(self, cfg: dict, kill: dict | None, progress: Path) -> tuple[dict, list[dict]]:
        """One training attempt -> (the zygote's reply, the child's progress records)."""
        self.proc.stdin.write(json.dumps({"cfg": cfg, "kill": kill, "progress": str(progress)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        records = [json.loads(x) for x in progress.read_text().splitlines()] if progress.exists() else []
        errors = [r["error"] for r in records if "error" in r]
        assert not errors, errors[0]
        return reply, records

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "zygote.log")
    yield z
    z.close()


KILL_STEPS = 6
#: Kill points by what they hit; "timer" kills at a random moment instead.
CATEGORIES = {"step": ("forward", "log_row"), "checkpoint": ("ckpt_file", "ckpt_dir", "latest", "prune", "prune_rm"),
              "lora": ("lora",), "cache": ("cache",)}


def kill_cfg(data, tmp: Path, resume: bool) -> dict:
    """The fields of the harness's TrainConfig (the tiny run of trainer_fixtures, checkpointed every step)."""
    return dataclasses.asdict(fx.train_config(
        data, tmp, cache_dir=str(tmp / "cache"), lr_schedule="warmup", warmup_steps=3, max_steps=KILL_STEPS,
        batch_size=1, save_every=1, keep_checkpoints=2, resume=str(tmp / "run") if resume else None))


def choose_kill(rng: random.Random, category: str, census: list[dict], done: int, timing: tuple[float, float]):
    """A kill plan of ``category`` that the next attempt reaches: an event of a step after ``done`` (the
    newest checkpoint on disk; the cache is only written before the first one), or a random moment."""
    if category == "timer":
        setup, per_step = timing
        return {"timer": rng.uniform(0.1, 1.0) * (setup + (KILL_STEPS - done) * per_step)}
    later = [e for e in census if e["label"][0] in CATEGORIES[category] and done < e["label"][1] <= done + 2
             or category == "lora" and e["label"][0] == "lora"]
    if not later:
        return None
    event = rng.choice(later)
    return {"label": event["label"], "mode": rng.choice(event["modes"])}


@pytest.mark.slow
def test_kill_9_at_random_points_loses_nothing(zygote, tmp_path):
    """Seeded: 5 runs of 6 steps (save every step), each killed with SIGKILL 6 times - in a training step,
    in a checkpoint write (a file cut short, before or after a rename, the old checkpoint half removed), in
    the final LoRA write, in the latent cache, at a random moment - and resumed after every kill. Each ends
    with the uninterrupted run's LoRA (bit for bit) and loss history (each step once); after every kill
    the files a loader reads are complete and at most one completed step is lost."""
    data = fx.make_images(tmp_path / "data", 4)
    ref_dir = tmp_path / "reference"
    census_path = tmp_path / "census.jsonl"
    reply, records = zygote.attempt(kill_cfg(data, ref_dir, False), {"census": str(census_path)},
                                    tmp_path / "reference.progress")
    assert reply["exit"] == 0 and records[-1]["done"] == "done"
    census = [json.loads(x) for x in census_path.read_text().splitlines()]
    first_forward = next(e["t"] for e in census if e["label"][0] == "forward")
    timing = (first_forward, (census[-1]["t"] - first_forward) / KILL_STEPS)
    reference, ref_log = loads(ref_dir / "lora.safetensors"), log_rows(ref_dir / "run")
    assert [s for s, _ in ref_log] == list(range(1, KILL_STEPS + 1))

    rng = random.Random(20240611)
    kills, stray, started, scenario = [], set(), time.perf_counter(), -1
    while scenario < 4 or len(kills) < 30:  # (a timer can fire after a short resumed attempt has finished)
        scenario += 1
        assert scenario < 10, kills
        tmp = tmp_path / f"run{scenario}"
        plan_categories = rng.sample(["step", "step", "checkpoint", "checkpoint", "timer"], 5) + ["lora"]
        if scenario == 0:
            plan_categories = ["cache"] + plan_categories[1:]
        done, finished = 0, False
        for n, category in enumerate(plan_categories + [None]):
            kill = choose_kill(rng, category, census, done, timing) if category else None
            if category and kill is None:
                continue
            progress = tmp / f"attempt{n}.progress"
            tmp.mkdir(exist_ok=True)
            reply, records = zygote.attempt(kill_cfg(data, tmp, (tmp / "run" / "latest").exists()), kill, progress)
            if reply["exit"] == 0:
                finished = True
                break
            assert reply["signal"] == signal.SIGKILL, reply
            completed = max([done] + [r["step"] for r in records if "step" in r and "done" not in r])
            hit = next((r["killed_at"] + [r["mode"]] for r in records if "killed_at" in r),
                       ["timer", kill.get("timer")])
            stray.update(p.name for p in temps(tmp / "run", tmp, tmp / "cache"))
            now = assert_loadable(tmp, KILL_STEPS)
            assert done <= now and completed - now <= 1, (hit, completed, now)  # at most one step of work lost
            kills.append({"scenario": scenario, "category": category, "hit": hit, "lost": completed - now})
            done = max([now] + list(checkpoint.checkpoints(tmp / "run")))
        assert finished, f"run {scenario} did not finish after its kills: {kills}"
        assert same_tensors(loads(tmp / "lora.safetensors"), reference)
        assert log_rows(tmp / "run") == ref_log  # every step once, the same losses
        assert temps(tmp / "run", tmp) == []  # what the kills left was cleaned on resume

    logging.getLogger(__name__).info(
        "kill harness: %d kills in %d runs (%s), %d steps lost in all (at most %d per kill), %.0f s; %d temporary "
        "files left by kills, all cleaned on resume; %s", len(kills), scenario + 1,
        ", ".join(f"{c} {n}" for c, n in Counter(k["category"] for k in kills).most_common()),
        sum(k["lost"] for k in kills), max(k["lost"] for k in kills), time.perf_counter() - started, len(stray), kills)
    assert len(kills) >= 20 and {"step", "checkpoint", "lora", "cache", "timer"} <= {k["category"] for k in kills}
    assert any(k["hit"][-1] == "partial" for k in kills) and stray  # files cut short mid-write were left, and ignored


@pytest.mark.parametrize("earlier_steps", [1, 3])
def test_a_fresh_run_replaces_an_earlier_runs_checkpoints_without_a_dangling_latest(tiny_sd15, train_images, tmp_path,
                                                                                      earlier_steps):
    """Another run's checkpoints in --run-dir (the same step, and later steps): each save of the fresh run
    leaves ``latest`` naming a complete checkpoint of the fresh run, and the earlier ones go."""
    fx_train(train_images, tmp_path / "a", tiny_sd15, max_steps=earlier_steps, save_every=1, keep_checkpoints=3,
             run_dir=str(tmp_path / "run"))
    seen = []

    def after_step(run, row):
        seen.append((checkpoint.latest(run.run_dir), sorted(checkpoint.checkpoints(run.run_dir))))

    from trainer.loop import train
    r = train(fx.train_config(train_images, tmp_path / "b", max_steps=2, save_every=1, seed=9,
                              run_dir=str(tmp_path / "run")), components=tiny_sd15, on_step=after_step)
    assert seen[1][0].name == "checkpoint-000001"  # at step 2, before its save: the fresh run's step 1
    runs = {json.loads((p / "run.json").read_text())["fingerprint"]
            for p in checkpoint.checkpoints(tmp_path / "run").values()}
    assert sorted(checkpoint.checkpoints(tmp_path / "run")) == [1, 2] and r["checkpoint"].endswith("checkpoint-000002")
    assert len(runs) == 1 and checkpoint.latest(tmp_path / "run").name == "checkpoint-000002"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """Only a dead process's temporaries of the named targets go; this process's own, and other files, stay."""
    from trainer.fileio import remove_stale_temps

    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    for name in (f".latest.tmp-{dead}", f".checkpoint-000003.old-{dead}", f".lora.safetensors.tmp-{dead}",
                 f".latest.tmp-{os.getpid()}", ".hidden", "latest"):
        (tmp_path / name).write_text("x")
    (tmp_path / f".checkpoint-000004.tmp-{dead}").mkdir()
    removed = {p.name for p in remove_stale_temps(tmp_path, {"latest", "checkpoint-000003", "checkpoint-000004"})}
    assert removed == {f".latest.tmp-{dead}", f".checkpoint-000003.old-{dead}", f".checkpoint-000004.tmp-{dead}"}
    assert {p.name for p in tmp_path.iterdir()} == {f".lora.safetensors.tmp-{dead}", f".latest.tmp-{os.getpid()}",
                                                   ".hidden", "latest"}


# ------------------------------------------------------------------------------------------------
# a full disk
# ------------------------------------------------------------------------------------------------
def digest(*paths) -> dict:
    """The bytes of every file under ``paths`` (files or folders)."""
    out = {}
    for path in map(Path, paths):
        for p in [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file()):
            out[str(p)] = p.read_bytes()
    return out


def run_cli(argv, components, caplog) -> tuple[int, list[logging.LogRecord]]:
    from trainer.distill import main

    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main([str(a) for a in argv], components=components)
    return rc, [r for r in caplog.records if r.levelno >= logging.ERROR]


def fill_disk_at(monkeypatch, pattern: str) -> list[str]:
    """Writes of safetensors files whose path matches ``pattern`` fail as on a full disk: with the error
    safetensors raises there (seen on a full tmpfs: its Rust writer keeps the OS message, not the errno)."""
    import safetensors
    import safetensors.torch

    real, refused = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        if re.search(pattern, str(filename)):
            refused.append(str(filename))
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return refused


def test_disk_full_stops_cleanly_keeps_everything_and_resumes_exactly(tiny_sd15, train_images, tmp_path,
                                                                       monkeypatch, caplog):
    """ENOSPC injected at a checkpoint write, then at the final LoRA write: each time exit status 3 and one
    error (no traceback) naming the file, the last good checkpoint and the resume command; the earlier
    checkpoint and the earlier LoRA at --out stay byte for byte; resumed once space is free, the run ends
    with the uninterrupted run's LoRA and loss history."""
    settings = ("--batch-size", 1, "--save-every", 1, "--lr-schedule", "warmup", "--warmup-steps", 3)
    straight = tmp_path / "straight"
    assert run_cli(fx.tiny_args(train_images, straight, "--max-steps", 4, *settings), tiny_sd15, caplog)[0] == 0
    run, out = tmp_path / "run", tmp_path / "lora.safetensors"

    def args(steps, *more):
        return fx.tiny_args(train_images, tmp_path, "--max-steps", steps, *settings, *more)

    assert run_cli(args(2), tiny_sd15, caplog)[0] == 0  # an earlier LoRA at --out (2 steps)
    kept = digest(out, run / "checkpoint-000002")

    with monkeypatch.context() as m:  # the disk fills up during the checkpoint of step 3
        refused = fill_disk_at(m, r"checkpoint-000003")
        rc, errors = run_cli(args(4, "--resume", run), tiny_sd15, caplog)
    assert rc == 3 and refused and len(errors) == 1 and not errors[0].exc_info
    msg = errors[0].getMessage()
    assert f"could not write {run / 'checkpoint-000003' / 'lora.safetensors'}" in msg and "disk is full" in msg
    assert f"the last good checkpoint is {run / 'checkpoint-000002'} (step 2)" in msg and f"{out} is untouched" in msg
    assert "Free space" in msg and f"continue with --resume {run}" in msg
    assert digest(out, run / "checkpoint-000002") == kept and checkpoint.latest(run).name == "checkpoint-000002"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001", "checkpoint-000002", "latest", "log.csv"]

    with monkeypatch.context() as m:  # space freed; then the disk fills up as the final LoRA is written
        refused = fill_disk_at(m, "^" + re.escape(str(tmp_path / ".lora.safetensors.tmp-")))
        rc, errors = run_cli(args(4, "--resume", run), tiny_sd15, caplog)
    assert rc == 3 and refused and len(errors) == 1
    msg = errors[0].getMessage()
    assert f"could not write {out}" in msg and f"last good checkpoint is {run / 'checkpoint-000004'} (step 4)" in msg
    assert digest(out) == {k: v for k, v in kept.items() if k == str(out)}  # the earlier LoRA, byte for byte

    assert run_cli(args(4, "--resume", run), tiny_sd15, caplog)[0] == 0  # space freed
    assert same_tensors(loads(out), loads(straight / "lora.safetensors"))
    assert log_rows(run) == log_rows(straight / "run")
    assert temps(run, tmp_path) == []


def _user_namespaces_work() -> bool:
    if not shutil.which("unshare") or not Path("/proc/self/ns/mnt").exists():
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(train_images, tmp_path):
    """The CLI on a real 8 MB tmpfs (private to a user namespace), filled up to half a checkpoint: exit
    status 3 with one message, the LoRA and the checkpoint unchanged, no leftovers; after the filler is
    deleted the resume ends as the uninterrupted run."""
    if not _user_namespaces_work():
        pytest.skip("no unprivileged user and mount namespaces here (unshare -rm): can't mount a small tmpfs; "
                    "test_disk_full_stops_cleanly_keeps_everything_and_resumes_exactly injects ENOSPC instead")
    disk, results = tmp_path / "disk", tmp_path / "results"
    disk.mkdir()
    results.mkdir()
    script = (f"mount -t tmpfs -o size=8m tmpfs '{disk}' && exec '{PY}' '{REPO / 'tests' / 'fault_tmpfs.py'}' "
              f"'{train_images}' '{disk}' '{results}'")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=fx.subprocess_env(), capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((results / "result.json").read_text())
    assert (r["first"], r["full"], r["resumed"]) == (0, 3, 0), r
    assert len(r["errors"]) == 1 and not r["errors"][0]["traceback"], r["errors"]
    msg = r["errors"][0]["message"]
    assert "disk is full" in msg and "No space left on device" in msg and "could not write" in msg
    assert f"last good checkpoint is {disk / 'run' / r['checkpoint']}" in msg and "--resume" in msg
    assert r["unchanged"] and r["latest"] == r["checkpoint"] and r["temps"] == []
    from trainer.loop import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): bit-equal sums need the same thread count
    try:
        straight = train(fx.train_config(train_images, tmp_path / "straight", max_steps=4, batch_size=1,
                                         save_every=1), components=fx.tiny_sd15(0))
    finally:
        torch.set_num_threads(threads)
    assert same_tensors(loads(results / "lora.safetensors"), loads(straight["out"]))
    assert log_rows(results) == log_rows(tmp_path / "straight" / "run")


def test_disk_full_is_told_apart_from_other_write_errors(tmp_path, monkeypatch):
    """The shapes a full disk takes (OSError ENOSPC/EDQUOT; torch's RuntimeError over it; safetensors' text),
    and an atomic write that meets one: DiskFullError naming the file, nothing left behind."""
    import errno

    import safetensors

    from trainer import fileio

    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")  # torch.save into a Python file
    assert fileio.is_disk_full(wrapped) and fileio.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert fileio.is_disk_full(safetensors.SafetensorError("Error while serializing: I/O error: No space left on "
                                                           "device (os error 28)"))
    assert not fileio.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not fileio.is_disk_full(ValueError("28 images"))

    class FullFile:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "open", lambda path, mode: (Path(path).touch(), FullFile())[1], raising=False)
    target = tmp_path / "f.bin"
    with pytest.raises(fileio.DiskFullError, match=f"disk is full: could not write {re.escape(str(target))}$"):
        fileio.atomic_write_bytes(target, b"data")
    assert not target.exists() and temps(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# bad data
# ------------------------------------------------------------------------------------------------
BAD_FILES = {  # name -> what is wrong with it, as the warning says
    "corrupt.png": "truncated or corrupt image",
    "empty.jpg": "empty file (0 bytes)",
    "text.webp": "not an image PIL can read",
    "truncated.png": "truncated or corrupt image",
    "latin1.png": "its caption latin1.txt is not valid UTF-8 (byte 0xe9 at offset 5)",
}


def bad_data_folder(folder: Path, order=None) -> Path:
    """4 good captioned images and one of each kind of bad file (``order``: the good ones' creation order)."""
    good = fx.make_images(folder / "src", 4)
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in good.iterdir()) if order is None else order:
        shutil.copy(good / name, folder / name)
    shutil.rmtree(good)
    png = (folder / "img_000.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[:60] + bytes(range(256)) * 4)  # valid header, garbage data
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.webp").write_text("this is not an image\n")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    shutil.copy(folder / "img_001.png", folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("a café in the rain".encode("latin-1"))
    for name in BAD_FILES:
        if name != "latin1.png":
            (folder / name).with_suffix(".txt").write_text("a caption")
    return folder


def test_bad_files_are_skipped_with_one_warning_each_and_counted(tiny_sd15, tmp_path, caplog):
    data = bad_data_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        r = fx_train(data, tmp_path, tiny_sd15, max_steps=1)
    assert r["status"] == "done" and r["skipped_images"] == len(BAD_FILES)
    for name, why in BAD_FILES.items():
        named = [rec.getMessage() for rec in caplog.records if name in rec.getMessage()]
        assert len(named) == 1 and why in named[0], (name, named)
    meta = read_header_metadata(r["out"])
    assert json.loads(meta["tdd_skipped_files"]) == len(BAD_FILES)
    assert sorted(json.loads(meta["tdd_skipped_names"])) == sorted(BAD_FILES)
    info = json.loads((Path(r["checkpoint"]) / "run.json").read_text())
    assert info["skipped_files"] == len(BAD_FILES) and sorted(info["skipped_names"]) == sorted(BAD_FILES)


def test_strict_data_refuses_bad_files_before_the_teacher_loads(tmp_path, caplog, monkeypatch):
    from trainer import loop

    data = bad_data_folder(tmp_path / "data")
    monkeypatch.setattr(loop, "_as_teacher", lambda *a: pytest.fail("the teacher was loaded"))
    rc, errors = run_cli(fx.tiny_args(data, tmp_path, "--strict-data"), None, caplog)
    assert rc == 2 and len(errors) == 1
    msg = errors[0].getMessage()
    assert msg.startswith(f"--strict-data: {len(BAD_FILES)} bad file(s) in {data}") and "drop --strict-data" in msg
    for name, why in BAD_FILES.items():
        assert f"{data / name} ({why}" in msg
    toml = tmp_path / "strict.toml"
    toml.write_text("strict-data = true\n")
    from trainer.config import parse_args
    assert parse_args(["--config", str(toml), "--teacher", "t", "--data", "d"]).strict_data


ORDER_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
from trainer import data
items, bad = data.scan(sys.argv[1], workers=int(sys.argv[2]))
print(json.dumps([__import__("os").path.basename(items[data.global_order(7, g, len(items))].path)
                  for g in range(3 * len(items))]))
"""


@pytest.mark.slow
def test_data_order_is_the_same_in_every_process(tmp_path):
    """Two copies of a folder with bad files, the good images created in opposite orders, scanned in two
    processes (one decoding with 4 threads): the same training order (seeded permutation per epoch)."""
    a = bad_data_folder(tmp_path / "a")
    b = bad_data_folder(tmp_path / "b", order=[f"img_{i:03d}{ext}" for i in (3, 2, 1, 0) for ext in (".txt", ".png")])
    script = ORDER_SCRIPT.format(repo=str(REPO))
    orders = [json.loads(subprocess.run([PY, "-c", script, str(folder), workers], env=fx.subprocess_env(),
                                        capture_output=True, text=True, check=True, timeout=300).stdout)
              for folder, workers in ((a, "1"), (b, "4"))]
    assert orders[0] == orders[1] and set(orders[0]) == {f"img_{i:03d}.png" for i in range(4)}
    assert orders[0][:4] != orders[0][4:8]  # a new permutation each epoch


# ------------------------------------------------------------------------------------------------
# output never clobbered; resume refuses another run's checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["other_run", "not_a_lora"])
def test_existing_out_of_another_run_is_refused_before_the_teacher_loads(tiny_sd15, train_images, tmp_path,
                                                                         monkeypatch, caplog, existing):
    from trainer import loop

    out = tmp_path / "lora.safetensors"
    if existing == "other_run":
        assert run_cli(fx.tiny_args(train_images, tmp_path / "other", "--seed", 5), tiny_sd15, caplog)[0] == 0
        shutil.copy(tmp_path / "other" / "lora.safetensors", out)
    else:
        out.write_text("my notes, not a LoRA")
    before = out.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(loop, "_as_teacher", lambda *a: pytest.fail("the teacher was loaded"))
        rc, errors = run_cli(fx.tiny_args(train_images, tmp_path), tiny_sd15, caplog)
    assert rc == 2 and out.read_bytes() == before
    msg = errors[0].getMessage()
    assert f"--out {out} already exists" in msg and "--overwrite" in msg and "another --out" in msg
    assert ("another run" if existing == "other_run" else "a file this run did not write") in msg
    assert run_cli(fx.tiny_args(train_images, tmp_path, "--overwrite"), tiny_sd15, caplog)[0] == 0
    assert read_header_metadata(out)["tdd_training_steps"] == "2"


def test_a_resumed_run_replaces_only_its_own_out(tiny_sd15, train_images, tmp_path, caplog):
    """Finishing to its own --out is a resume's job (more steps); an --out another run wrote since is refused."""
    out = tmp_path / "lora.safetensors"
    assert run_cli(fx.tiny_args(train_images, tmp_path, "--max-steps", 1), tiny_sd15, caplog)[0] == 0
    assert run_cli(fx.tiny_args(train_images, tmp_path, "--max-steps", 2, "--resume", tmp_path / "run"),
                   tiny_sd15, caplog)[0] == 0
    assert read_header_metadata(out)["tdd_training_steps"] == "2"
    assert run_cli(fx.tiny_args(train_images, tmp_path / "other", "--seed", 5), tiny_sd15, caplog)[0] == 0
    shutil.copy(tmp_path / "other" / "lora.safetensors", out)
    rc, errors = run_cli(fx.tiny_args(train_images, tmp_path, "--max-steps", 3, "--resume", tmp_path / "run"),
                         tiny_sd15, caplog)
    assert rc == 2 and "another run" in errors[0].getMessage()


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, train_images):
    tmp = tmp_path_factory.mktemp("one_step")
    fx_train(train_images, tmp, fx.tiny_sd15(0), max_steps=1, batch_size=1)
    return tmp


@pytest.mark.parametrize("change,key", [
    ({"lr": 2e-3}, "lr"), ({"seed": 1}, "seed"), ({"rank": 8}, "rank"), ({"alpha": 4}, "alpha"),
    ({"method": "tcd"}, "method"), ({"kmax": 6}, "kmax"), ({"eta_max": 0.2}, "eta_max"),
    ({"teacher_guidance": 2.0}, "teacher_guidance"), ({"loss": "l2"}, "loss"), ({"huber_c": 0.01}, "huber_c"),
    ({"empty_prompt_prob": 0.5}, "empty_prompt_prob"), ({"weight_decay": 0.01}, "weight_decay"),
    ({"warmup_steps": 2}, "warmup_steps"), ({"adam_beta2": 0.99}, "adam_beta2"), ({"grad_clip": 0.5}, "grad_clip"),
    ({"batch_size": 2}, "global_batch"), ({"grad_accum": 2}, "global_batch"), ({"center_crop": True}, "center_crop"),
    ({"precision": "bf16"}, "precision"), ({"base_dtype": "bf16"}, "base_dtype"),
])
def test_resume_refuses_a_changed_setting_naming_exactly_it(tiny_sd15, train_images, one_step_run, tmp_path,
                                                             change, key):
    from trainer.checkpoint import ResumeError

    kw = {"max_steps": 2, "batch_size": 1, "resume": str(one_step_run / "run"), **change}
    with pytest.raises(ResumeError) as e:
        fx_train(train_images, tmp_path, tiny_sd15, **kw)
    assert re.findall(r"(\w+): checkpoint ", str(e.value)) == [key], str(e.value)


def test_resume_accepts_changed_bookkeeping(tiny_sd15, train_images, one_step_run, tmp_path):
    """Settings that don't change the result may change on resume: paths, intervals, workers, --overwrite,
    --strict-data, gradient checkpointing, --max-steps (constant schedule), the cache."""
    r = fx_train(train_images, tmp_path, tiny_sd15, resume=str(one_step_run / "run"), max_steps=2, batch_size=1,
                 save_every=7, log_every=2, keep_checkpoints=5, num_workers=2, overwrite=True, strict_data=True,
                 gradient_checkpointing=True, validate_every=0, cache_dir=str(tmp_path / "cache"), save_dtype="fp32")
    assert r["status"] == "done" and r["step"] == 2
