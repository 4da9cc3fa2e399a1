"""TDD Distill's training step vs the CLI trainer's on the same config, side by side in one run.

The same run (the demo model, the pack's 256 demo images at 64 px, quick-preset settings, seed 0)
is trained by ``trainer/distill.py`` in a subprocess and by the TDD Distill node in a ComfyUI server,
alternating round by round so machine noise hits both alike. Each round's step time is the median of
its per-step times from the run's log.csv (the first steps left out: warm-up), both runs reading
encoded images from a filled cache. Prints the node/CLI ratio per round and overall; target <= 1.05.

    .venv/bin/python bench/distill_node_cost.py [--rounds 3] [--steps 40] [--batch 16]
"""
from __future__ import annotations

import argparse
import csv
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import harness  # noqa: E402

log = logging.getLogger("bench")
WARMUP = 5


def step_seconds(log_csv: Path, batch: int) -> float:
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(batch / float(r["samples_per_s"]) for r in rows[WARMUP:])


def cli_round(base: Path, images: Path, out: Path, args) -> float:
    run = out / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "trainer" / "distill.py"), "--teacher", "nodes/demo_model.py:load_demo",
           "--preset", "quick", "--data", str(images), "--out", str(out / "lora.safetensors"), "--run-dir", str(run),
           "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--lr", "5e-4", "--resolution", "64",
           "--seed", "0", "--cache-dir", str(base / "models" / "tdd_distill_runs" / "cli_cache"), "--no-progress"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return step_seconds(run / "log.csv", args.batch)


def node_round(server, base: Path, name: str, args) -> float:
    graph = {"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights": "shipped (demo/weights)"}},
             "2": {"class_type": "TDDDistill", "inputs": {
                 "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": "tdd_demo_shapes", "method": "tdd",
                 "preset": "quick", "steps": args.steps, "batch": args.batch, "lr": 5e-4, "rank": 0, "seed": 0,
                 "resolution": 64, "lora_name": name, "resume": False, "overwrite": True}}}
    server.run(graph, timeout=1800)
    return step_seconds(base / "models" / "tdd_distill_runs" / name / "log.csv", args.batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="tdd_bench_distill_") as tmp:
        base = Path(tmp) / "base"
        with harness.ComfyServer(base) as server:
            images = base / "input" / "tdd_demo_shapes"  # written by the pack when the server loaded it
            node_round(server, base, "bench_warm", args)   # fills the node's cache, loads the host
            cli_round(base, images, Path(tmp) / "cli", args)  # fills the CLI's cache
            ratios = []
            for r in range(args.rounds):
                cli = cli_round(base, images, Path(tmp) / "cli", args)
                node = node_round(server, base, f"bench_{r}", args)
                ratios.append(node / cli)
                log.info("round %d: step %.3f s in the node, %.3f s in the CLI: node/CLI = %.3f", r + 1, node, cli,
                         node / cli)
    log.info("node/CLI step time, median of %d rounds: %.3f (target <= 1.05)", args.rounds, statistics.median(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
