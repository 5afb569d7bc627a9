"""The documentation states the same rules as the code."""

import pathlib

import refimpl.numerics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(text: str) -> str:
    start = text.index("==============  ====")
    lines = text[start:].splitlines()
    end = max(i for i, line in enumerate(lines) if line.startswith("==============  ===="))
    return "\n".join(line.rstrip() for line in lines[: end + 1])


def test_cast_point_table_in_docs_equals_the_code():
    doc = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")
    assert _table(doc) == _table(refimpl.numerics.__doc__)


def test_readme_opens_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    run = lines.index("# run the embedded default model")
    test = lines.index("# run the tests")
    assert lines[run + 1].endswith("python -m refimpl run")
    assert lines[test + 1].startswith("python3 -m venv") and "pytest" in lines[test + 1]
    assert run < 15 and test < 15
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "# run the tests" in ci
