"""The notebooks: built from notebooks/src/, committed with outputs, and executable end to end.

Each notebook asserts its own claims in its cells, so executing it is the test of what it
teaches. Executed with nbclient in a fresh `python3` kernel, cwd = notebooks/, MPLBACKEND=Agg.
"""

import importlib.util
import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 300
MAX_BYTES = 1_500_000


def _load_builder():
    spec = importlib.util.spec_from_file_location("notebooks_build", os.path.join(NB_DIR, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_builder()
SOURCES = build.source_files()
NAMES = [build.notebook_name(s) for s in SOURCES]


def _read(name):
    return nbformat.read(os.path.join(NB_DIR, name), as_version=4)


def test_every_notebook_is_listed_in_the_readme():
    with open(os.path.join(NB_DIR, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert len(NAMES) == 8
    for name in NAMES:
        assert name in readme, f"{name} is not listed in notebooks/README.md"


@pytest.mark.parametrize("source", SOURCES)
def test_committed_notebook_matches_its_source(source):
    """The .ipynb holds exactly the cells of notebooks/src/<name>.py (rebuild after editing:
    python notebooks/build.py <prefix>)."""
    built = build.build_notebook(source)
    committed = _read(build.notebook_name(source))
    assert [(c.cell_type, c.source) for c in committed.cells] == \
        [(c.cell_type, c.source) for c in built.cells]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_outputs_and_is_small(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "saved without executing"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline PNG figure"
    assert os.path.getsize(os.path.join(NB_DIR, name)) < MAX_BYTES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_without_error(name, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel is launched as `python`: make it this interpreter (the venv's)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    nb = _read(name)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": NB_DIR}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
