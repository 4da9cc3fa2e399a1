"""`make demo`: the shipped demo workflow in a real, headless ComfyUI, teacher vs TDD, as one grid.

Starts ComfyUI (CPU) on 127.0.0.1 with this pack, converts workflows/tdd_demo.json to the API
format, and queues, for several prompts and seeds, its teacher branch (stock KSampler, 25 steps,
CFG 4.5) and its TDD branch (teacher + TDD LoRA, TDD nodes) at 4 and 8 steps. Writes
out/tdd_demo_grid.png (rows: prompt and seed; columns: teacher 25, TDD 4, TDD 8) and prints the
wall-time speed-up measured in this run, plus a detail measure (mean |Laplacian|) per column.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import harness  # noqa: E402
import workflow_tools  # noqa: E402
from demo import dataset  # noqa: E402

log = logging.getLogger("demo")
PROMPTS = [
    "a red striped circle at the top left on a light background",
    "a blue checked square in the center on a dark background",
    "a yellow outlined triangle at the bottom right on a dark background",
    "a green diamond at the top on a light background",
]
COLUMNS = [("teacher, 25 steps", None), ("TDD, 4 steps", 4), ("TDD, 8 steps", 8)]


def branch(api: dict, save_type_prefix: str) -> dict:
    """The sub-graph of ``api`` that feeds the SaveImage whose prefix starts with ``save_type_prefix``."""
    (out_id,) = [k for k, n in api.items() if n["class_type"] == "SaveImage"
                 and n["inputs"]["filename_prefix"].startswith(save_type_prefix)]
    keep, todo = set(), [out_id]
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        todo += [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: api[k] for k in keep}


def set_inputs(graph: dict, class_type: str, **values) -> None:
    for node in graph.values():
        if node["class_type"] == class_type:
            node["inputs"].update(values)


def prompt_node(graph: dict) -> dict:
    return next(n for n in graph.values() if n["class_type"] == "CLIPTextEncode" and n["inputs"]["text"])


def execution_seconds(entry: dict) -> float:
    """Server-side execution time of a prompt, from its history's start and success timestamps."""
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]
              if kind in ("execution_start", "execution_success")}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def run_one(server, graph) -> tuple[np.ndarray, float]:
    entry = server.run(graph)
    seconds = execution_seconds(entry)
    (path,) = server.output_images(entry)
    return np.asarray(Image.open(path).convert("RGB")), seconds


def make_grid(rows: list[list[np.ndarray]], labels: list[str], scale: int = 3) -> Image.Image:
    size, pad, label_w, head = dataset.SIZE * scale, 6, 300, 22
    grid = Image.new("RGB", (label_w + len(COLUMNS) * (size + pad), head + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, _) in enumerate(COLUMNS):
        draw.text((label_w + c * (size + pad) + 4, 4), title, fill="black")
    for r, (images, label) in enumerate(zip(rows, labels)):
        y = head + r * (size + pad)
        draw.multiline_text((4, y + 4), "\n".join(textwrap.wrap(label, 44)), fill="black")
        for c, img in enumerate(images):
            grid.paste(Image.fromarray(img).resize((size, size), Image.NEAREST), (label_w + c * (size + pad), y))
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(REPO / "out" / "tdd_demo_grid.png"))
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "tdd_demo.json"),
                    help="the demo workflow to queue (e.g. an older version, to compare)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="tdd_demo_") as tmp:  # the server's base dir, removed afterwards
        base = harness.make_base_dir(tmp, with_test_pack=False)
        with harness.ComfyServer(base) as server:
            log.info("ComfyUI with the TDD pack: %s", server.url)
            api = workflow_tools.to_api(workflow_tools.load(Path(args.workflow)), server.object_info())
            teacher, student = branch(api, "tdd_demo/teacher"), branch(api, "tdd_demo/tdd")
            run_one(server, teacher)  # warm-up: loads the model and the LoRA once
            run_one(server, student)
            rows, labels, times = [], [], {title: [] for title, _ in COLUMNS}
            for text in PROMPTS:
                for seed in args.seeds:
                    row = []
                    for title, steps in COLUMNS:
                        graph = {k: {**v, "inputs": dict(v["inputs"])} for k, v in (teacher if steps is None else student).items()}
                        prompt_node(graph)["inputs"]["text"] = text
                        set_inputs(graph, "KSampler", seed=seed)
                        set_inputs(graph, "RandomNoise", noise_seed=seed)
                        if steps is not None:
                            set_inputs(graph, "TDDScheduler", steps=steps)
                        img, seconds = run_one(server, graph)
                        row.append(img)
                        times[title].append(seconds)
                    rows.append(row)
                    labels.append(f"{text} (seed {seed})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels).save(out)
    log.info("grid: %s", out)
    teacher_s = sum(times[COLUMNS[0][0]])
    for title, _ in COLUMNS:
        column = np.stack([row[[t for t, _ in COLUMNS].index(title)] for row in rows])
        log.info("%-18s %6.2f s for %d images   detail (mean |Laplacian|) %.1f", title, sum(times[title]),
                 len(times[title]), dataset.detail_energy(column))
    for title, _ in COLUMNS[1:]:
        log.info("speed-up of %s over the teacher, measured in this run: %.1fx", title, teacher_s / sum(times[title]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
