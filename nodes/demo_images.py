"""The demo images TDD Distill's shipped workflow trains on (workflows/tdd_distill_demo.json):
``input/tdd_demo_shapes``, 256 captioned 64x64 images of the demo model's procedural dataset
(demo/dataset.py, seed 0), written when the pack loads if the folder is not there yet."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

import folder_paths

log = logging.getLogger("tdd")

FOLDER = "tdd_demo_shapes"
COUNT = 256
DATASET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "dataset.py")


def _dataset():
    name = "tdd_demo_dataset"
    if name not in sys.modules:  # (registered first: its dataclasses look their module up there)
        spec = importlib.util.spec_from_file_location(name, DATASET)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def ensure_demo_images(count: int = COUNT) -> str:
    """The folder's path; its images are written once (a partial folder from an interrupted write is
    completed, existing files are left as they are)."""
    from PIL import Image

    folder = os.path.join(folder_paths.get_input_directory(), FOLDER)
    names = [f"{i:04d}" for i in range(count)]
    if all(os.path.isfile(os.path.join(folder, n + ".txt")) for n in names):
        return folder
    os.makedirs(folder, exist_ok=True)
    dataset = _dataset()
    for i, name in enumerate(names):
        png, txt = os.path.join(folder, name + ".png"), os.path.join(folder, name + ".txt")
        if os.path.isfile(txt):
            continue
        img, caption, _ = dataset.sample(0, i)
        Image.fromarray(img).save(png)
        with open(txt, "w", encoding="utf-8") as f:  # the caption last: its presence marks the pair done
            f.write(caption)
    log.info("TDD: wrote %d demo training images to %s (for workflows/tdd_distill_demo.json)", count, folder)
    return folder
