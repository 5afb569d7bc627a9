"""The documentation states the same rules as the code."""

import pathlib
import subprocess
import sys

import refimpl.numerics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(text: str) -> str:
    start = text.index("==============  ====")
    lines = text[start:].splitlines()
    end = max(i for i, line in enumerate(lines) if line.startswith("==============  ===="))
    return "\n".join(line.rstrip() for line in lines[: end + 1])


def test_cast_point_table_in_docs_equals_the_code():
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")
    assert _table(doc) == refimpl.numerics.cast_point_table()
    assert _table(refimpl.numerics.__doc__) == refimpl.numerics.cast_point_table()


def test_golden_works_under_python_OO(tmp_path):
    """The cast-point table is data, not a docstring: -OO (docstrings stripped) writes the
    same case bytes."""
    out = {}
    for flags in ([], ["-OO"]):
        d = tmp_path / ("oo" if flags else "plain")
        r = subprocess.run([sys.executable, *flags, "-m", "refimpl", "golden", "--preset",
                            "tiny-moge", "--ops", "moe,rms_norm", "--tokens", "4", "--out", d],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[bool(flags)] = {f.relative_to(d): f.read_bytes() for f in d.rglob("*") if f.is_file()}
    assert out[True] == out[False] and len(out[True]) == 4


def test_the_repository_root_is_not_on_sys_path():
    """kernels/ (installed as refimpl.kernels) must not be importable as a top-level
    `kernels`: transformers imports the PyPI package of that name (pyproject's importlib
    import mode and the README's `pytest` command keep the root off sys.path)."""
    here = [p for p in sys.path if pathlib.Path(p or ".").resolve() == ROOT]
    assert not here, f"{ROOT} is on sys.path: run the tests with `pytest`, not `python -m pytest`"
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or pathlib.Path(spec.origin).resolve().parent != ROOT / "kernels"


def test_no_test_skips_for_a_hard_dependency():
    """Skips are for optional tools only (a C++ compiler, Linux /proc files): a missing test
    dependency fails its tests instead of hiding them."""
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text(encoding="utf-8")
        assert "pytest.importor" + "skip(" not in text, path.name


def test_installed_test_dependencies_are_the_pinned_ones():
    """A version difference fails and says why (pyproject pins torch exactly)."""
    import torch

    pins = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch==2.13.0"' in pins
    assert torch.__version__.split("+")[0] == "2.13.0", (
        f"torch {torch.__version__} is installed; the test extra pins 2.13.0 (CPU)")


def test_readme_opens_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    run = lines.index("# run the embedded default model")
    test = lines.index("# run the tests")
    assert lines[run + 1].endswith("python -m refimpl run")
    assert lines[test + 1].startswith("python3 -m venv") and "&& pytest " in lines[test + 1]
    assert run < 15 and test < 15
    assert "-rs" in lines[test + 1].split("pytest", 1)[1]  # CI prints the skip list
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "# run the tests" in ci


def test_readme_api_snippet_runs():
    """The README's API block, as written (from the repository root, where its paths are)."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## The API\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "model.step(" in block and "new_paged_cache" in block
    r = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
