"""The Colab notebooks (`colab/*.ipynb`) run top to bottom on a CPU, and every notebook is stored without outputs.

Each notebook runs in a fresh IPython kernel of this interpreter (a kernelspec written into the test's temporary
folder, so no installed kernelspec can point elsewhere), with its working folder `colab/` (relative paths as when
a user opens it there) and ``BITLAWS_NOTEBOOK_OUT`` set to the test's temporary folder: the notebooks write
everything there, and the test checks that `colab/` gains no file. The kernel inherits the test run's
environment, so it shares the run's JAX compilation cache (`tests/conftest.py`).

Every `colab/*.ipynb` gets a test (a new notebook is covered without touching this file); `SLOW` lists the ones
too long for the default suite. Per-notebook wall times: ``pytest tests/colab -n 2 --durations=0``.
"""

import os
import pathlib
import time

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
COLAB = ROOT / "colab"
OUT_ENV = "BITLAWS_NOTEBOOK_OUT"
CELL_TIMEOUT_S = 600
KERNEL_NAME = "bitlaws-test"
SLOW: frozenset[str] = frozenset()  # notebook stems kept out of `make test` (run by `make test-slow`)
# Folders never searched for notebooks: environments, build output, sweep runs.
SKIP_DIRS = frozenset({"node_modules", "build", "dist", "runs", "__pycache__"})


def _colab_notebooks() -> list[pathlib.Path]:
    return sorted(COLAB.glob("*.ipynb"))


def _repo_notebooks() -> list[pathlib.Path]:
    """Every ``.ipynb`` in the repository outside hidden folders (.git, .venv, .ipynb_checkpoints) and `SKIP_DIRS`."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found.extend(pathlib.Path(folder) / name for name in files if name.endswith(".ipynb"))
    return sorted(found)


def _params(paths: list[pathlib.Path]) -> list:
    return [pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem in SLOW else []) for path in paths]


def _files(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if ".ipynb_checkpoints" not in p.parts}


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
    """A kernel manager that starts ``sys.executable -m ipykernel_launcher`` (this environment's python)."""
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / KERNEL_NAME)
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def test_there_are_notebooks():
    assert len(_colab_notebooks()) >= 5, [p.name for p in _colab_notebooks()]


@pytest.mark.parametrize("path", _params(_colab_notebooks()))
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(OUT_ENV, str(out))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(path, as_version=4)
    before = _files(COLAB)
    km = _kernel_manager(tmp_path)
    client = NotebookClient(notebook, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(COLAB)}})
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError naming the cell and its traceback
    finally:  # a kernel manager we pass in is ours to stop: nbclient leaves its kernel (~1 GB) running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    assert _files(COLAB) == before, f"{path.name} wrote into colab/: {sorted(_files(COLAB) - before)}"
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert not errors
    assert out.is_dir(), f"{path.name} did not create its output folder ${OUT_ENV}"


def test_notebooks_start_with_the_install_cell():
    """The first code cell imports bitlaws, installs it only when that fails, and writes under $BITLAWS_NOTEBOOK_OUT."""
    for path in _colab_notebooks():
        notebook = nbformat.read(path, as_version=4)
        first = next(cell for cell in notebook.cells if cell.cell_type == "code").source
        for needed in ("BITLAWS_REPO = ", "try:\n    import bitlaws\nexcept ImportError:", "%pip install", OUT_ENV):
            assert needed in first, f"{path.name}: the first code cell lacks {needed!r}"


def test_every_notebook_is_stored_without_outputs():
    dirty = []
    notebooks = _repo_notebooks()
    assert notebooks
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            where = f"{path.relative_to(ROOT)} cell {index}"
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                dirty.append(f"{where}: outputs or execution_count")
            if "execution" in cell.metadata:
                dirty.append(f"{where}: execution timing metadata")
        if "widgets" in notebook.metadata:
            dirty.append(f"{path.relative_to(ROOT)}: widget state in the notebook metadata")
    assert not dirty, "strip outputs before committing (e.g. `jupyter nbconvert --clear-output`):\n" + "\n".join(dirty)
