"""TDD Distill inside a real ComfyUI server, over HTTP: the demo model distilled on a folder of demo
images; the LoRA file, its outputs in the stock nodes (LoraLoader, SaveLoRA, Plot Loss Graph),
Cancel (/interrupt) and resume equal to an uninterrupted run, reuse of a finished file, and each bad
input refused with a message while the server goes on serving."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import harness
from demo import dataset

FOLDER = "tdd_distill_shapes"
PROMPT = "a red striped circle at the top left on a dark background"


def write_images(folder: Path, n: int, size: int = dataset.SIZE, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        img, caption, _ = dataset.sample(0, i)
        Image.fromarray(img).resize((size, size)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def images(comfy_base) -> Path:
    return write_images(comfy_base / "input" / FOLDER, 8)


def distill_inputs(lora_name: str, **over) -> dict:
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": FOLDER, "method": "tdd",
              "preset": "quick", "steps": 3, "batch": 2, "lr": 0.0, "rank": 4, "seed": 0, "resolution": 64,
              "lora_name": lora_name, "resume": True, "overwrite": False}
    inputs.update(over)
    return inputs


def distill_graph(lora_name: str, **over) -> dict:
    return {"1": {"class_type": "TDDDemoCheckpointLoader", "inputs": {"weights": "shipped (demo/weights)"}},
            "2": {"class_type": "TDDDistill", "inputs": distill_inputs(lora_name, **over)}}


def sample_nodes(model_ref, clip_ref, prefix: str, first_id: int = 10) -> dict:
    """A 4-step TDD sample of PROMPT from ``model_ref`` (KSampler with the tdd sampler and scheduler)."""
    i = [str(first_id + k) for k in range(5)]
    return {
        i[0]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": PROMPT}},
        i[1]: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": ""}},
        i[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[3]: {"class_type": "KSampler", "inputs": {"model": model_ref, "positive": [i[0], 0], "negative": [i[1], 0],
                                                    "latent_image": [i[2], 0], "seed": 3, "steps": 4, "cfg": 1.7,
                                                    "sampler_name": "tdd", "scheduler": "tdd", "denoise": 1.0}},
        i[4]: {"class_type": "VAEDecode", "inputs": {"samples": [i[3], 0], "vae": ["1", 2]}},
    }


def lora_path(comfy_base, name: str) -> Path:
    return comfy_base / "models" / "loras" / f"{name}.safetensors"


def run_dir(comfy_base, name: str) -> Path:
    return comfy_base / "models" / "tdd_distill_runs" / name


def error_text(exc: harness.ComfyError) -> str:
    return json.dumps(exc.detail) if exc.detail is not None else str(exc)


def test_distill_node_is_listed_with_tooltips(server, images):
    info = server.object_info("TDDDistill")["TDDDistill"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert {"model", "clip", "vae", "images", "method", "preset", "steps", "batch", "lr", "rank", "seed", "resolution",
            "lora_name", "resume", "overwrite", "gradient_checkpointing", "precision"} <= set(inputs)
    assert all(spec[1].get("tooltip") for spec in inputs.values() if len(spec) > 1), inputs
    assert FOLDER in inputs["images"][1]["options"]
    assert inputs["preset"][1]["options"][0] == "quick"
    assert set(inputs["method"][1]["options"]) == {"tdd", "tdd-adv", "tcd", "lcm"}
    assert info["output"][:4] == ["MODEL", "CLIP", "LORA_MODEL", "LOSS_MAP"]


def test_distill_writes_a_lora_the_stock_nodes_use(server, comfy_base, images):
    name = "distill_demo_a"
    graph = distill_graph(name, steps=20, lr=5e-3)
    graph.update(sample_nodes(["2", 0], ["1", 1], "with"))                       # the node's own MODEL output
    graph["54"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "d_with"}}
    graph["60"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["2", 2], "prefix": "loras/distill_saved"}}
    graph["61"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["2", 3], "filename_prefix": "distill_loss"}}
    entry = server.run(graph, timeout=600)
    # then the file in the stock LoraLoader (a second prompt: the file did not exist when the first was checked)
    graph = {"1": distill_graph(name)["1"],
             "20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                           "lora_name": f"{name}.safetensors",
                                                           "strength_model": 1.0, "strength_clip": 1.0}}}
    graph.update(sample_nodes(["20", 0], ["20", 1], "stock", first_id=30))
    graph.update(sample_nodes(["1", 0], ["1", 1], "base", first_id=40))           # the teacher, no LoRA
    graph["55"] = {"class_type": "SaveImage", "inputs": {"images": ["34", 0], "filename_prefix": "d_stock"}}
    graph["56"] = {"class_type": "SaveImage", "inputs": {"images": ["44", 0], "filename_prefix": "d_base"}}
    log_start = len(server.log_text())
    stock_entry = server.run(graph, timeout=600)

    path = lora_path(comfy_base, name)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["tdd_method"] == "tdd" and meta["tdd_training_steps"] == "20" and meta["tdd_base_arch"]
    assert meta["tdd_run_fingerprint"] and meta["ss_network_dim"] == "4"
    assert any(k.endswith(".alpha") for k in keys)
    # every key matched: the host logs "lora key not loaded" for any it can't place
    assert "lora key not loaded" not in server.log_text()[log_start:]
    outs = {p.name.split("_0")[0]: np.asarray(Image.open(p), dtype=np.float32)
            for p in server.output_images(entry) + server.output_images(stock_entry) if p.name.startswith("d_")}
    assert np.array_equal(outs["d_with"], outs["d_stock"])       # node output == file in the stock loader
    assert np.abs(outs["d_with"] - outs["d_base"]).mean() > 0.5  # the LoRA changes the 4-step image (0-255)
    saved = sorted((comfy_base / "output" / "loras").glob("distill_saved*.safetensors"))
    assert saved and set(load_file(str(saved[-1]))) == set(keys)
    assert entry["outputs"]["61"]["images"]  # the loss graph, shown as a preview
    losses = [float(r.split(",")[1]) for r in (run_dir(comfy_base, name) / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 20
    # the new file is in every LoRA list without a restart
    loader = server.object_info("TDDLoraLoader")["TDDLoraLoader"]["input"]["required"]["lora_name"]
    assert f"{name}.safetensors" in loader[1]["options"]


def test_requeue_reuses_the_finished_file(server, comfy_base, images):
    name = "distill_demo_reuse"
    server.run(distill_graph(name), timeout=600)
    path = lora_path(comfy_base, name)
    mtime = path.stat().st_mtime_ns
    # the same run again with only `overwrite` changed (not a training setting): ComfyUI's cache does
    # not answer it, the finished file does, and nothing is trained or replaced
    entry = server.run(distill_graph(name, overwrite=True), timeout=600)
    assert path.stat().st_mtime_ns == mtime
    text = json.dumps(entry["outputs"])
    assert "reused" in text, text
    # another run with the same name never replaces it silently: a numbered file instead
    server.run(distill_graph(name, seed=1), timeout=600)
    assert path.stat().st_mtime_ns == mtime
    assert lora_path(comfy_base, f"{name}_2").is_file()


def wait_for_rows(log_csv: Path, rows: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_csv.is_file() and len(log_csv.read_text().splitlines()) - 1 >= rows:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{log_csv} did not reach {rows} rows")


def test_interrupt_leaves_a_checkpoint_and_resume_equals_an_uninterrupted_run(server, comfy_base, images):
    steps = 40
    name = "distill_demo_interrupted"
    status, body = server.queue(distill_graph(name, steps=steps, batch=1))
    assert status == 200, body
    wait_for_rows(run_dir(comfy_base, name) / "log.csv", 3)
    server._request("POST", "/interrupt", {})
    entry = server.wait(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "error"   # ComfyUI's status for an interrupted prompt
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    assert not lora_path(comfy_base, name).exists()                            # nothing half-written
    latest = (run_dir(comfy_base, name) / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert 3 <= stopped_at < steps

    server.run(distill_graph(name, steps=steps, batch=1), timeout=600)           # resume on (default)
    server.run(distill_graph("distill_demo_straight", steps=steps, batch=1), timeout=600)
    resumed = load_file(str(lora_path(comfy_base, name)))
    straight = load_file(str(lora_path(comfy_base, "distill_demo_straight")))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    read = lambda n: [r.split(",")[:2] for r in (run_dir(comfy_base, n) / "log.csv").read_text().splitlines()[1:]]
    assert [int(s) for s, _ in read(name)] == list(range(1, steps + 1))            # no gap, no duplicate
    assert read(name) == read("distill_demo_straight")


def test_cancel_while_calibrating_keeps_the_checkpoint_and_queueing_again_calibrates(server, comfy_base):
    """Cancel during calibration (a reference preset, which calibrates; 128 px so that it lasts a few
    seconds): the prompt ends "interrupted" within seconds, no LoRA is written, the checkpoint holds
    both steps; queued again, the node trains nothing and calibrates and writes the LoRA."""
    folder = "tdd_distill_shapes_128"
    write_images(comfy_base / "input" / folder, 4, size=128)
    name = "distill_demo_cancel_calibration"
    graph = distill_graph(name, images=folder, preset="sd15", steps=2, batch=2, resolution=128)
    since = len(server.log_text())
    new_log = lambda: server.log_text()[since:]
    status, body = server.queue(graph)
    assert status == 200, body
    deadline = time.time() + 300
    while time.time() < deadline and "calibrating (" not in new_log():
        time.sleep(0.05)
    assert (run_dir(comfy_base, name) / "latest").read_text().strip() == "checkpoint-000002"
    sent = time.monotonic()
    server._request("POST", "/interrupt", {})
    entry = server.wait(body["prompt_id"], timeout=300, poll=0.05)
    delay = time.monotonic() - sent
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    assert "while calibrating" in new_log(), new_log()[-3000:]
    assert delay < 5.0, f"{delay:.1f} s from Cancel to the prompt's end"
    print(f"Cancel during calibration: the prompt ended {delay:.2f} s after /interrupt")
    assert not lora_path(comfy_base, name).exists()

    server.run(graph, timeout=600)
    meta = safe_open(str(lora_path(comfy_base, name)), "pt").metadata()
    table = json.loads(meta["tdd_calibration"])
    assert table["plan"]["level"] == "floor" and meta["tdd_training_steps"] == "2"
    assert [r.split(",")[0] for r in (run_dir(comfy_base, name) / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]


# ------------------------------------------------------------------------------------------------
# Bad input: refused with a message naming the fix; nothing lost; the server keeps serving
# ------------------------------------------------------------------------------------------------

def failure(server, graph) -> str:
    with pytest.raises(harness.ComfyError) as exc:
        server.run(graph, timeout=600)
    return error_text(exc.value)


@pytest.mark.parametrize("bad", ["../escape", "sub/dir", "a\\b", "..", ""])
def test_lora_name_with_a_path_is_refused(server, images, bad):
    text = failure(server, distill_graph(bad))
    assert "lora_name" in text and "models/loras" in text, text


def test_missing_folder_is_refused_naming_only_images(server, images):
    status, payload = server.queue(distill_graph("x", images="no_such_folder"))
    assert status == 400, payload
    errors = payload["node_errors"]["2"]["errors"]
    assert {e["extra_info"]["input_name"] for e in errors} == {"images"}, errors
    assert "no_such_folder" in json.dumps(errors) and "input directory" in json.dumps(errors), errors


@pytest.mark.parametrize("kind", ["empty", "unreadable", "small"])
def test_bad_image_folders_are_refused(server, comfy_base, images, kind):
    folder = comfy_base / "input" / f"bad_{kind}"
    folder.mkdir(exist_ok=True)
    if kind == "unreadable":
        for i in range(2):
            (folder / f"{i}.png").write_bytes(b"not an image at all")
            (folder / f"{i}.txt").write_text("a red circle")
    elif kind == "small":
        write_images(folder, 2, size=32)
    text = failure(server, distill_graph(f"bad_{kind}", images=f"bad_{kind}"))
    expected = {"empty": "no usable training images", "unreadable": "2 undecodable",
                "small": "smaller than the training resolution 64px"}[kind]
    assert expected in text, text
    assert not lora_path(comfy_base, f"bad_{kind}").exists()


BATCH = "(the image_batch input)"


def batch_graph(name: str, captions: str) -> dict:
    """TDD Distill on an IMAGE batch: 2 red and 2 blue 64 px images (EmptyImage + ImageBatch)."""
    graph = distill_graph(name, images=BATCH, captions=captions, image_batch=["5", 0], steps=2)
    graph["3"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xCC2020}}
    graph["4"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x2020CC}}
    graph["5"] = {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["4", 0]}}
    return graph


def test_an_image_batch_with_captions_is_trained_on(server, comfy_base, images):
    """An IMAGE batch and one caption per line: the LoRA is written, the batch was saved as a captioned
    folder named by its content, and the same batch queued again is the same data set (reused)."""
    name = "distill_batch"
    captions = "a red square\na red square\na blue square\na blue square"
    entry = server.run(batch_graph(name, captions), timeout=600)
    assert lora_path(comfy_base, name).is_file()
    folders = [f for f in (comfy_base / "models" / "tdd_distill_runs" / "batches").iterdir() if f.is_dir()]
    texts = sorted(t.read_text() for f in folders for t in f.glob("*.txt"))
    assert texts == sorted(captions.split("\n")) and len([p for f in folders for p in f.glob("*.png")]) == 4
    mtime = lora_path(comfy_base, name).stat().st_mtime_ns
    again = batch_graph(name, captions)
    again["2"]["inputs"]["overwrite"] = True  # not a training setting: the host's cache does not answer it
    text = json.dumps(server.run(again, timeout=600)["outputs"])
    assert "reused" in text and lora_path(comfy_base, name).stat().st_mtime_ns == mtime, text
    assert entry["outputs"]


@pytest.mark.parametrize("captions, wired, expected", [
    ("one\ntwo\nthree", True, "captions has 3 lines for an image_batch of 4 images"),
    ("", False, "nothing is wired into image_batch"),
])
def test_bad_image_batch_inputs_are_refused(server, comfy_base, images, captions, wired, expected):
    graph = batch_graph("distill_bad_batch", captions)
    if not wired:
        del graph["2"]["inputs"]["image_batch"]
    text = failure(server, graph)
    assert expected in text, text
    assert not lora_path(comfy_base, "distill_bad_batch").exists()


def test_resume_of_another_method_is_refused_and_keeps_the_checkpoint(server, comfy_base, images):
    name = "distill_demo_switch"
    status, body = server.queue(distill_graph(name, steps=40, batch=1))
    assert status == 200, body
    wait_for_rows(run_dir(comfy_base, name) / "log.csv", 2)
    server._request("POST", "/interrupt", {})
    server.wait(body["prompt_id"], timeout=300)
    latest = run_dir(comfy_base, name) / "latest"
    before = latest.read_text()
    text = failure(server, distill_graph(name, steps=40, batch=1, method="lcm"))
    assert "method" in text and "'tdd'" in text and "'lcm'" in text, text
    assert latest.read_text() == before and (run_dir(comfy_base, name) / before.strip() / "lora.safetensors").is_file()


def test_server_runs_a_good_prompt_after_bad_ones(server, comfy_base, images):
    server.run(distill_graph("distill_after_bad", steps=1), timeout=600)
    assert lora_path(comfy_base, "distill_after_bad").is_file()


# ------------------------------------------------------------------------------------------------
# The shipped workflow: the demo model distilled in the graph, on the pack's demo images
# ------------------------------------------------------------------------------------------------

DISTILL_DEMO = harness.REPO / "workflows" / "tdd_distill_demo.json"
DEMO_PROMPTS = ["a red striped circle at the top left on a light background",
                "a blue square at the center on a dark background",
                "a yellow checked triangle at the bottom right on a dark background",
                "a green outlined diamond at the top on a light background"]


def test_shipped_distill_workflow_beats_the_teacher_at_4_steps(server, comfy_base):
    """workflows/tdd_distill_demo.json as the UI queues it: the pack wrote its 256 demo images at
    start-up; the distilled model's 4-step image is closer to the teacher's 25-step image than the
    teacher's own 4-step image is, over four prompts (mean absolute pixel difference)."""
    import workflow_tools as wt

    assert len(list((comfy_base / "input" / "tdd_demo_shapes").glob("*.txt"))) == 256
    api = wt.to_api(wt.load(DISTILL_DEMO), server.object_info())
    (prompt_id,) = [k for k, v in api.items() if v["class_type"] == "CLIPTextEncode" and v["inputs"]["text"]]
    gaps = []
    for i, text in enumerate(DEMO_PROMPTS):
        api[prompt_id]["inputs"]["text"] = text
        started = time.monotonic()
        entry = server.run(api, timeout=900)
        if i == 0:
            log_csv = run_dir(comfy_base, "tdd_demo_distilled") / "log.csv"
            trained = len(log_csv.read_text().splitlines()) - 1
            assert trained == 300, trained
            print(f"distill workflow, first run: {time.monotonic() - started:.0f} s")
        imgs = {p.name.split("_0")[0]: np.asarray(Image.open(p), dtype=np.float32)
                for p in server.output_images(entry) if p.parent.name == "tdd_distill_demo"}
        teacher = imgs["teacher_25"]
        gaps.append((np.abs(imgs["tdd_4"] - teacher).mean(), np.abs(imgs["teacher_4"] - teacher).mean()))
    print("distill workflow: |tdd_4 - teacher_25|, |teacher_4 - teacher_25| per prompt:", gaps)
    student, teacher4 = np.mean([g[0] for g in gaps]), np.mean([g[1] for g in gaps])
    assert student < teacher4, gaps


def test_unsupported_model_family_is_refused_naming_the_supported_ones(server, images):
    """A model the distillation can't serve (here the demo model switched to LCM's x0 sampling by the
    stock ModelSamplingDiscrete node: already distilled) is refused by name with the families the
    trainer supports."""
    graph = distill_graph("unsupported_family")
    graph["5"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False}}
    graph["2"]["inputs"]["model"] = ["5", 0]
    text = failure(server, graph)
    assert "unsupported teacher SD15" in text and "LCM sampling" in text and "SD1.5, SD2.x, SDXL" in text, text


def test_training_leaves_the_loaded_model_unpatched(server, comfy_base, images):
    """The teacher's 4-step image from the loaded model is the same before and after a TDD Distill
    run on that model object (ComfyUI's cache hands the same loader output to both prompts)."""
    def teacher_image(tag: str, pad: str):
        # (`pad` spaces after the prompt tokenize the same, but make ComfyUI compute the sample anew)
        graph = {"1": distill_graph("x")["1"], **sample_nodes(["1", 0], ["1", 1], "base", first_id=40)}
        graph["40"]["inputs"]["text"] = PROMPT + pad
        graph["56"] = {"class_type": "SaveImage", "inputs": {"images": ["44", 0], "filename_prefix": f"unpatched_{tag}"}}
        (path,) = server.output_images(server.run(graph, timeout=600))
        return np.asarray(Image.open(path), dtype=np.float32)

    before = teacher_image("before", " ")
    server.run(distill_graph("distill_unpatched", steps=5, lr=5e-3), timeout=600)
    after = teacher_image("after", "  ")
    assert np.array_equal(before, after)
