"""The shipped notebooks run top to bottom against a fitted demo run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emimimic.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name
)
def test_notebook_runs(notebook, demo_store, tmp_path):
    run_dir = tmp_path / "run"
    cli_main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "quickstart.yaml"),
            "--data.store",
            str(demo_store),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.max_epochs",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(STORE=str(demo_store), RUN_DIR=str(run_dir))
            continue
        exec(compile("".join(cell["source"]), f"{notebook.name}", "exec"), namespace)
    scores = namespace["scores"]
    assert set(scores) == {"pearson"} | {f"pearson/{t}" for t in namespace["data"].targets}
    assert -1 <= scores["pearson"] <= 1
    assert tuple(namespace["out"].pred.shape) == (64, len(namespace["data"].targets))
