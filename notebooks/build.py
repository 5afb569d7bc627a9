"""Build the notebooks from their Python sources, execute them, and save them with outputs.

Each notebook is written as a plain Python file in ``notebooks/src/`` in the "percent" format:
a line ``# %%`` starts a code cell, ``# %% [markdown]`` starts a markdown cell whose lines are
comments (the leading ``# `` is removed). Edit the source, then run

    python notebooks/build.py                 # build and execute every notebook
    python notebooks/build.py 04              # only the notebooks whose name starts with 04
    python notebooks/build.py --no-execute    # cells only, no outputs

Execution uses nbclient with the ``python3`` kernel, working directory ``notebooks/``; each
notebook is written to a temporary name and renamed, so a failed run leaves the old file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
CELL_TIMEOUT_S = 240


def source_files() -> list:
    """The notebook sources, in order: notebooks/src/NN_name.py."""
    return sorted(f for f in os.listdir(SRC) if f[:2].isdigit() and f.endswith(".py"))


def notebook_name(source_file: str) -> str:
    return source_file[:-3] + ".ipynb"


def parse_cells(text: str) -> list:
    """[(kind, source)] from percent-format text; kind is 'code' or 'markdown'."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is not None:
            body = "\n".join(lines).strip("\n")
            if body:
                cells.append((kind, body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line)
    flush()
    return cells


def build_notebook(source_file: str) -> nbformat.NotebookNode:
    """An unexecuted notebook from one source file."""
    with open(os.path.join(SRC, source_file), encoding="utf-8") as fh:
        cells = parse_cells(fh.read())
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, body) in enumerate(cells):
        cell = (nbformat.v4.new_markdown_cell(body) if kind == "markdown"
                else nbformat.v4.new_code_cell(body))
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel with cwd = notebooks/; raises on any error."""
    from nbclient import NotebookClient

    env_path = os.path.dirname(sys.executable)
    os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")  # the venv's python
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": HERE}})
    client.execute()
    return nb


def write_atomic(nb: nbformat.NotebookNode, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="name prefixes of the notebooks to build")
    parser.add_argument("--no-execute", action="store_true", help="write cells without outputs")
    args = parser.parse_args(argv)
    for source_file in source_files():
        if args.only and not any(source_file.startswith(p) for p in args.only):
            continue
        nb = build_notebook(source_file)
        start = time.perf_counter()
        if not args.no_execute:
            execute(nb)
        path = os.path.join(HERE, notebook_name(source_file))
        write_atomic(nb, path)
        print(f"{notebook_name(source_file)}: {len(nb.cells)} cells, "
              f"{time.perf_counter() - start:.1f} s, {os.path.getsize(path) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
