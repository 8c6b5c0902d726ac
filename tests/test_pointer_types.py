"""`Pointer`'s registry methods and operators are typed: the stubs generated from the op registry
(fedptr/pointer_methods.py) are fresh, installed at run time, and give mypy precise result types.

The mypy check runs the real type checker (``mypy.api``) on a small snippet with the project's
strict configuration, against the repository's mypy cache (warm after ``mypy`` has run once).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import mypy.api
import pytest

from fedptr import opinfo
from fedptr.pointer import Pointer
from fedptr.pointer_methods import PointerMethods

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = textwrap.dedent(
    """
    from typing import assert_type

    from fedptr.pointer import Pointer


    def check(p: Pointer, q: Pointer) -> None:
        assert_type(p.add(q, alpha=2), Pointer)
        assert_type(p.sum().exp().relu(), Pointer)
        assert_type(p + 1, Pointer)
        assert_type(1 + p, Pointer)
        assert_type(2 ** p, Pointer)
        assert_type(p @ q, Pointer)
        assert_type(-p, Pointer)
        assert_type(abs(p), Pointer)
        assert_type(~p, Pointer)
        assert_type(p < q, Pointer)
        assert_type(p >= 0, Pointer)
        assert_type(p == q, bool)
        v, i = p.max(dim=0)
        assert_type(v, Pointer)
        assert_type(i, Pointer)
        assert_type(p.min(0, keepdim=True), tuple[Pointer, Pointer])
        assert_type(p.max(), Pointer)
        assert_type(p.max(q), Pointer)
        assert_type(p.min(other=q), Pointer)
        assert_type(p.topk(3), tuple[Pointer, Pointer])
        assert_type(p.aminmax(), tuple[Pointer, Pointer])
        assert_type(p.split(2), tuple[Pointer, ...])
        assert_type(p.mul_(2), Pointer)
        p += q
        assert_type(p, Pointer)
        p.no_such_op()  # error: attr-defined
        n: int = p.add(q)  # error: assignment
    """
)


def test_the_stubs_are_the_registrys() -> None:
    text = (ROOT / opinfo.STUBS_MODULE).read_text()
    assert text == opinfo.pointer_stubs(), (
        f"{opinfo.STUBS_MODULE} is stale: regenerate it with python -m fedptr.opinfo --stubs > {opinfo.STUBS_MODULE}"
    )


def test_every_stub_is_installed_and_only_for_type_checkers() -> None:
    assert Pointer.__bases__ == (object,)  # the stubs class is a base for mypy only
    stubbed = {name for name, value in vars(PointerMethods).items() if callable(value)}
    installed = {attr for attr, _ in opinfo.pointer_attributes()}
    assert stubbed == installed
    for name in installed:
        assert getattr(Pointer, name) is not getattr(PointerMethods, name), name


def test_mypy_types_registry_methods_and_operators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    monkeypatch.chdir(ROOT)  # the project's configuration and mypy cache
    stdout, stderr, _ = mypy.api.run(["--config-file", "pyproject.toml", "--no-error-summary", str(snippet)])
    # every error, wherever mypy found it (an ill-typed stub would be reported in its own file)
    errors = re.findall(r"^(.+?):(\d+): error: .*\[([a-z-]+)\]$", stdout, re.MULTILINE)
    found = {(Path(file).name, line, code) for file, line, code in errors}
    expected = {
        (snippet.name, str(n), m.group(1))
        for n, line in enumerate(SNIPPET.splitlines(), 1)
        if (m := re.search(r"# error: ([a-z-]+)", line))
    }
    assert found == expected, stdout + stderr
