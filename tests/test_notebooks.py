"""The shipped notebooks run top to bottom on small settings, and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from support.reference import REPO

from emimimic.cli import cli_main

NOTEBOOKS = REPO / "notebooks"


def run_notebook(path: Path, parameters: dict) -> dict:
    """Executes a notebook's code cells in one namespace, its `parameters` cell replaced."""
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(parameters)
            continue
        exec(compile("".join(cell["source"]), path.name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_quickstart_notebook_trains_and_plots(demo_store, tmp_path):
    ns = run_notebook(NOTEBOOKS / "quickstart.ipynb",
                      {"STORE": str(demo_store), "RUN_DIR": str(tmp_path), "EPOCHS": 2})
    targets = ns["data"].targets
    assert sorted(ns["history"]) == [0, 1]
    assert set(ns["scores"]) == {"val/pearson"} | {f"val/pearson/{t}" for t in targets}
    assert ns["scores"]["val/pearson"] == max(h["val/pearson"] for h in ns["history"].values())
    assert _png(tmp_path / "per_target.png")[0] > 100 and _png(tmp_path / "curves.png")[0] > 100


def test_analysis_notebook_reads_a_checkpoint(demo_store, tmp_path):
    run_dir = tmp_path / "run"
    cli_main(["fit", "-c", str(REPO / "configs" / "quickstart.yaml"), "--data.store",
              str(demo_store), "--trainer.default_root_dir", str(run_dir),
              "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"])
    ns = run_notebook(NOTEBOOKS / "analysis.ipynb",
                      {"STORE": str(demo_store), "RUN_DIR": str(run_dir)})
    result, targets = ns["result"], ns["data"].targets
    assert result.pred.shape == result.target.shape == (64, len(targets))
    assert list(ns["errors"].index) == targets
    assert ns["vad"].shape[1] == 3 and len(ns["vad"]) > 0
    for name in ("scatter.png", "vad.png"):
        assert _png(run_dir / name)[0] > 100
