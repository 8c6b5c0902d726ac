"""The docs cannot rot: the site builds with warnings as errors (its API reference from the
docstrings), the notebooks execute headless with every cell succeeding, and every ``fedptr.NAME``
the docs mention exists."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import fedptr

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

DOTTED = re.compile(r"(?<![\w./\"'-])fedptr(?:\.[A-Za-z_]\w*)+")
"""A dotted name the docs use, ``fedptr.dp.train``; not a path (``api/fedptr.md``) nor a quoted
logger name (``"fedptr.node"`` in a sample log line)."""


def _resolve(dotted: str) -> object:
    """The object `dotted` names, walked by attribute from ``import fedptr`` (so a submodule the
    lazy attribute map misses fails), or an importable module (``fedptr.nodes``, a package the
    library itself never imports). Raises AttributeError or ImportError."""
    parts = dotted.split(".")
    try:
        obj: object = fedptr
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        for cut in range(len(parts), 1, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            if cut == 2 and parts[1] in fedptr._SUBMODULES:
                raise  # a fedptr submodule must be an attribute after `import fedptr`, not only importable
            for part in parts[cut:]:
                obj = getattr(obj, part)
            return obj
        raise


def _doc_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PAGES}
    for nb in NOTEBOOKS:
        texts[nb.relative_to(ROOT).as_posix()] = "".join(c.source for c in nbformat.read(nb, as_version=4).cells)
    for page, text in texts.items():
        for name in DOTTED.findall(text):
            names.setdefault(name, set()).add(page)
    return names


def test_every_fedptr_name_in_the_docs_exists() -> None:
    names = _doc_names()
    assert "fedptr.dp.train" in names and "fedptr.connect" in names  # the grep finds names at all
    missing = {}
    for name, pages in sorted(names.items()):
        try:
            _resolve(name)
        except (AttributeError, ImportError) as e:
            missing[name] = f"{sorted(pages)}: {e}"
    assert missing == {}


def test_every_submodule_is_an_attribute_of_the_package() -> None:
    modules = {p.stem for p in (ROOT / "fedptr").glob("*.py") if p.stem != "__init__"}
    assert modules <= fedptr._SUBMODULES
    for name in sorted(modules):
        assert getattr(fedptr, name).__name__ == f"fedptr.{name}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "api" / "client" / "index.html").read_text()
    assert "fedptr.client.Worker" in reference and "fedptr.client.connect" in reference
    assert (tmp_path / "site" / "PRIVACY" / "index.html").exists()


def test_there_is_a_seed_tutorial_notebook() -> None:
    assert ROOT / "examples" / "seed_tutorial.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=120,
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
