"""The shipped notebooks run top to bottom in a real Jupyter kernel on small settings, show their
figures as images, and are committed without outputs.

The kernel is the test's own Python (``ipykernel`` from the ``notebooks`` extra, which ``dev``
includes), started through a kernelspec written to a temporary folder: nothing is registered with
Jupyter and nothing is written outside the temporary folders.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from support.reference import QUICKSTART, REPO

from emimimic.cli import cli_main

NOTEBOOKS = REPO / "notebooks"
#: Tag of the cell injected after a notebook's ``parameters`` cell (papermill's name for it).
INJECTED = "injected-parameters"
#: Why the kernel tests skip, where they do.
EXTRA = "needs the notebooks extra: pip install -e '.[dev]'"
#: Marks the line the appended report cell prints.
REPORT = "emimimic-test-report: "


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def _parameters_cell(nb: dict) -> dict:
    """Returns the notebook's parameters cell, checking it is its first code cell."""
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), "first code cell: the parameters"
    return code[0]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    for cell in _notebook(path)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_default_parameters_are_the_demo_jobs_folders():
    """Jupyter starts a kernel in the notebook's folder: the default paths are the README's."""
    config = yaml.safe_load(QUICKSTART.read_text())
    params = {}
    for name in ("quickstart", "analysis"):
        namespace: dict = {}
        exec("".join(_parameters_cell(_notebook(NOTEBOOKS / f"{name}.ipynb"))["source"]),
             namespace)
        params[name] = {k: (NOTEBOOKS / v).resolve() for k, v in namespace.items()
                        if k in ("STORE", "RUN_DIR")}
    store = REPO / config["data"]["store"]
    assert params["quickstart"]["STORE"] == params["analysis"]["STORE"] == store
    assert params["analysis"]["RUN_DIR"] == REPO / config["trainer"]["default_root_dir"]
    assert params["quickstart"]["RUN_DIR"].parent == REPO / "runs"  # git-ignored


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns a folder of kernelspecs holding one, ``python3``: this Python's ipykernel."""
    pytest.importorskip("ipykernel", reason=EXTRA)
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (emimimic tests)",
        "language": "python",
        # IPython's profile and history go here, not to ~/.ipython
        "env": {"IPYTHONDIR": str(root / "ipython"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
        "metadata": {"debugger": False},
    }))
    return root


def run_notebook(path: Path, parameters: dict, cwd: Path, kernel_specs: Path,
                 report: dict[str, str]) -> tuple[dict, dict]:
    """Executes a notebook in a Jupyter kernel started in ``cwd``; returns the executed notebook
    and the ``report`` expressions' values (JSON), evaluated by a cell appended at the end.

    ``parameters`` are assigned in a cell injected after the notebook's parameters cell (as
    papermill does). A cell that raises fails the test with the cell's traceback.
    """
    nbclient = pytest.importorskip("nbclient", reason=EXTRA)
    nbformat = pytest.importorskip("nbformat")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    first = nb.cells.index(next(c for c in nb.cells if c.cell_type == "code"))
    assert "parameters" in nb.cells[first].metadata.get("tags", [])
    assigned = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    injected = nbformat.v4.new_code_cell(assigned, metadata={"tags": [INJECTED]})
    values = ", ".join(f"{name!r}: {expr}" for name, expr in report.items())
    checks = nbformat.v4.new_code_cell(
        f"import json as _json\nprint({REPORT!r} + _json.dumps({{{values}}}, default=float))",
        metadata={"tags": ["injected-report"]})
    nb.cells[first + 1:first + 1] = [injected]
    nb.cells.append(checks)

    km = KernelManager(
        kernel_name="python3", connection_file=str(cwd / ".kernel-connection.json"),
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_specs / "kernels")]))
    client = nbclient.NotebookClient(nb, km=km, timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    line = next(line for line in printed.splitlines() if line.startswith(REPORT))
    return nb, json.loads(line[len(REPORT):])


def _ends_with_figure(source: str) -> bool:
    """Whether a cell's last statement is the expression ``fig`` (the cell shows a figure)."""
    body = ast.parse(source).body
    last = body[-1] if body else None
    return (isinstance(last, ast.Expr) and isinstance(last.value, ast.Name)
            and last.value.id == "fig")


def figure_images(nb: dict) -> list[bytes]:
    """Returns the PNGs the notebook displayed, checking that each cell ending with a figure shows
    exactly one and that no other cell shows any."""
    images = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        pngs = [o["data"]["image/png"] for o in cell["outputs"]
                if o["output_type"] in ("execute_result", "display_data")
                and "image/png" in o["data"]]
        assert len(pngs) == _ends_with_figure(cell["source"]), cell["source"]
        if pngs:
            result = next(o for o in cell["outputs"] if o["output_type"] == "execute_result")
            assert "Figure size" in result["data"]["text/plain"]
            images.append(base64.b64decode(pngs[0]))
    return images


def _pixels(png: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _assert_same_image(shown: bytes, saved: Path) -> None:
    """The figure a cell displayed is the one it saved: same size, and the same pixels but for
    the odd pixel (constrained layout moves the panels of a shared-axes grid by a pixel or so
    between a figure's first draw, the save, and its second, the display)."""
    a, b = _pixels(shown), _pixels(saved)
    assert a.shape == b.shape
    assert (a != b).any(axis=2).mean() < 0.05


@pytest.mark.slow  # a Jupyter kernel: a subprocess
def test_quickstart_notebook_trains_and_shows_its_figures(demo_store, tmp_path, kernel_specs):
    run_dir = tmp_path / "run"
    nb, ns = run_notebook(
        NOTEBOOKS / "quickstart.ipynb",
        {"STORE": str(demo_store), "RUN_DIR": str(run_dir), "EPOCHS": 2}, tmp_path, kernel_specs,
        {"history": "sorted(int(e) for e in history)", "scores": "scores",
         "best": "max(h['val/pearson'] for h in history.values())",
         "targets": "list(data.targets)",
         "ckpts": "sorted(__import__('os').listdir(f'{RUN_DIR}/checkpoints'))"})
    assert ns["history"] == [0, 1]
    assert set(ns["scores"]) == {"val/pearson"} | {f"val/pearson/{t}" for t in ns["targets"]}
    assert ns["scores"]["val/pearson"] == ns["best"]
    assert "last.ckpt" in ns["ckpts"] and len(ns["ckpts"]) >= 2  # best and last
    shown = figure_images(nb)
    saved = [run_dir / "per_target.png", run_dir / "curves.png"]
    assert len(shown) == len(saved)
    for png, path in zip(shown, saved, strict=True):  # what the notebook shows is what it saved
        _assert_same_image(png, path)
    assert _pixels(saved[0]).shape == (400, 640, 3) and _pixels(saved[1]).shape == (350, 900, 3)


@pytest.mark.slow  # a Jupyter kernel: a subprocess
def test_analysis_notebook_reads_a_checkpoint(demo_store, tmp_path, kernel_specs):
    run_dir = tmp_path / "run"
    cli_main(["fit", "-c", str(QUICKSTART), "--data.store", str(demo_store),
              "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", "2",
              "--trainer.enable_progress_bar", "false"])
    nb, ns = run_notebook(
        NOTEBOOKS / "analysis.ipynb", {"STORE": str(demo_store), "RUN_DIR": str(run_dir)},
        tmp_path, kernel_specs,
        {"shapes": "[result.pred.shape, result.target.shape]", "targets": "list(data.targets)",
         "errors": "list(errors.index)", "vad": "vad.shape"})
    targets = ns["targets"]
    assert ns["shapes"] == [[64, len(targets)]] * 2
    assert ns["errors"] == targets
    assert ns["vad"][1] == 3 and ns["vad"][0] > 0
    cell = next(c for c in nb.cells if c.source.endswith("errors.round(4)"))
    table = next(o for o in cell.outputs if o.output_type == "execute_result")
    assert "text/html" in table.data and "Pearson r" in table.data["text/html"]  # errors.round(4)
    shown = figure_images(nb)
    saved = [run_dir / "scatter.png", run_dir / "vad.png"]
    assert len(shown) == len(saved)
    for png, path in zip(shown, saved, strict=True):
        _assert_same_image(png, path)
    assert _pixels(saved[0]).shape == (560, 900, 3) and _pixels(saved[1]).shape == (280, 900, 3)
