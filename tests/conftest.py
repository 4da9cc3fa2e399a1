"""Session fixtures: a real ComfyUI host (in-process and as a server) with this pack and the
test-only pack ``tdd_test_nodes`` installed in a temporary base directory.

Fixtures (all session-scoped):
  comfy_base  Path of the base directory (custom_nodes/, models/loras, input/, output/, user/)
  host        ComfyUI's ``nodes`` module, loaded in this process with that base directory
  tiny        the ``tdd_test_nodes.tiny`` module (build_tiny_sd15, write_kohya_lora, ...)
  lora_files  {"good": Path, "sdxl": Path, "corrupt": Path} in comfy_base/models/loras
  server      a started harness.ComfyServer on that base directory (marker ``server``)
  trainer_host  (module-scoped) the in-process host, set up before a trainer test imports ``comfy``

The repository root and tests/ are importable: trainer tests ``import trainer_fixtures as fx`` and
``from trainer... import ...`` without path set-up of their own.

Tests that use ``server`` are marked ``server`` automatically: ``pytest -m "not server"`` skips them.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

if str(harness.REPO) not in sys.path:
    sys.path.append(str(harness.REPO))

GOOD_LORA = "tiny_tdd.safetensors"
SDXL_LORA = "sdxl_other.safetensors"
CORRUPT_LORA = "corrupt.safetensors"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the item (``item.rep_setup``, ``rep_call``, ``rep_teardown``), so a
    fixture's teardown can tell whether its test failed (the browser tests then write a report)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    base = os.environ.get("TDD_TEST_BASE_DIR")
    return harness.make_base_dir(base if base else tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def host(comfy_base):
    return harness.inprocess_host(comfy_base)


@pytest.fixture(scope="session")
def tiny(host):
    return importlib.import_module("tdd_test_nodes.tiny")


@pytest.fixture(scope="session")
def lora_files(comfy_base, tiny) -> dict:
    loras = comfy_base / "models" / "loras"
    model = tiny.build_tiny_unet(0)
    files = {"good": loras / GOOD_LORA, "sdxl": loras / SDXL_LORA, "corrupt": loras / CORRUPT_LORA}
    tiny.write_kohya_lora(files["good"], model, rank=4, seed=0)
    tiny.write_foreign_lora(files["sdxl"], kind="sdxl")
    tiny.write_corrupt_file(files["corrupt"])
    return files


@pytest.fixture(scope="session")
def server(comfy_base, lora_files):
    srv = harness.ComfyServer(comfy_base)
    srv.start(timeout=float(os.environ.get("TDD_SERVER_START_TIMEOUT", "180")))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def trainer_host(host):
    """The session's in-process ComfyUI is set up before a trainer test touches ``comfy`` (importing
    ``comfy.cli_args`` first would disable the harness's argument parsing); CPU mode."""
    import trainer_fixtures

    trainer_fixtures.ensure_host("cpu")


@pytest.fixture(scope="module")
def tiny_sd15(trainer_host):
    """A tiny SD1.5-class teacher (host classes, seed 0) for the trainer tests, fresh per module."""
    import trainer_fixtures

    return trainer_fixtures.tiny_sd15(0)


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    """Four captioned training images for the trainer tests."""
    import trainer_fixtures

    return trainer_fixtures.make_images(tmp_path_factory.mktemp("train_images"), 4)

