"""The import rules of the module map (docs/ARCHITECTURE.md), checked on the source, transitively:

* the wire, envelope and session modules import no zmq, asyncio or torch (sans-IO);
* the broker imports no torch;
* nodes never import the client, and the client never imports nodes or the broker;
* at run time, a node loads no Opacus until it runs a DP mechanism, its meta runs no
  torch._dynamo (torch.compile's ~40 MiB), an idle node none of `LAZY`, and `fedptr --help`
  no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fedptr": ROOT / "fedptr", "fedptr.broker": ROOT / "broker", "fedptr.nodes": ROOT / "nodes"}
CLIENT_SIDE = (
    "fedptr.client",
    "fedptr.pointer",
    "fedptr.cluster",
    "fedptr.optim",
    "fedptr.aggregate",
    "fedptr.meta",
    "fedptr.data",
    "fedptr.broadcasting",
)


def module_file(name: str) -> Path | None:
    for package, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if name == package:
            return folder / "__init__.py"
        if name.startswith(package + "."):
            rest = name[len(package) + 1 :].split(".")
            if len(rest) == 1 and (folder / f"{rest[0]}.py").exists():
                return folder / f"{rest[0]}.py"
    return None


@cache
def direct_imports(name: str) -> frozenset[str]:
    """What module `name` imports at run time (not under TYPE_CHECKING)."""
    path = module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}"))
    return frozenset(found)


def closure(name: str) -> set[str]:
    """Every module `name` imports, following fedptr's own modules transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        for imported in direct_imports(current):
            if imported not in seen:
                seen.add(imported)
                if module_file(imported) is not None:
                    todo.append(imported)
    return seen


def modules_of(package: str) -> list[str]:
    return [f"{package}.{p.stem}" for p in sorted(PACKAGES[package].glob("*.py")) if p.stem != "__init__"]


def top_levels(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("module", ["fedptr.wire", "fedptr.envelope", "fedptr.session"])
def test_protocol_and_session_are_sans_io(module: str) -> None:
    assert not top_levels(closure(module)) & {"zmq", "asyncio", "torch"}


@pytest.mark.parametrize("module", modules_of("fedptr.broker"))
def test_broker_imports_no_torch(module: str) -> None:
    imported = closure(module)
    assert "torch" not in top_levels(imported)
    assert not {m for m in imported if m.startswith("fedptr.nodes")}


@pytest.mark.parametrize("module", modules_of("fedptr.nodes"))
def test_nodes_never_import_the_client(module: str) -> None:
    assert not closure(module) & set(CLIENT_SIDE)


@pytest.mark.parametrize("module", [m for m in modules_of("fedptr") if m != "fedptr.cli"])
def test_the_library_never_imports_nodes_or_the_broker(module: str) -> None:
    assert not {m for m in closure(module) if m.startswith(("fedptr.nodes", "fedptr.broker"))}


def test_the_rules_see_imports() -> None:
    """The checker itself: it finds known imports, relative ones included."""
    assert "torch" in top_levels(closure("fedptr.nodes.node"))
    assert "fedptr.nodes.store" in closure("fedptr.nodes.node")
    assert "fedptr.wire" in closure("fedptr.session")


def _modules_after(code: str, top_level: bool = True) -> set[str]:
    """The modules (top-level names only, unless told) a fresh interpreter has loaded after running `code`."""
    names = "{m.split('.')[0] for m in sys.modules}" if top_level else "sys.modules"
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({names})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_a_node_loads_opacus_only_for_dp() -> None:
    """Importing the node (and its DP modules) loads no Opacus: the first DP use does."""
    loaded = _modules_after("import fedptr.nodes.node, fedptr.nodes.__main__, fedptr.nodes.launcher")
    assert "torch" in loaded
    assert "opacus" not in loaded


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_a_nodes_meta_runs_load_no_dynamo() -> None:
    """A cold node's meta runs (the ops a client uses most, and a model's forward as DP-SGD's
    check runs it: each calls `guard.meta_result` first, which loads the meta kernels) leave
    torch.compile's machinery unloaded: ~40 MiB and ~1.5 CPU seconds per node."""
    loaded = _modules_after(
        "import torch\n"
        "from fedptr.nodes import guard\n"
        "forward = guard.meta_result('forward', [torch.nn.Linear(3, 2), torch.ones(4, 3)], {})\n"
        "assert forward.device.type == 'meta' and forward.shape == (4, 2)\n"
        "m = torch.ones(3, 3)\n"
        "for op in ('mul', 'add', 'sub', 'matmul', 'relu', 'sum', 'mean', 'exp'):\n"
        "    args = [m] if op in ('relu', 'sum', 'mean', 'exp') else [m, m]\n"
        "    assert guard.meta_result(op, args, {}).device.type == 'meta'",
        top_level=False,
    )
    assert "torch._meta_registrations" in loaded  # the probe did run meta kernels
    assert "torch._dynamo" not in loaded


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_the_cli_help_and_the_broker_load_no_torch() -> None:
    loaded = _modules_after(
        "import contextlib, io\n"
        "from fedptr.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['--help']) == 0\n"
        "assert 'up' in out.getvalue()\n"
        "import fedptr.broker.__main__"
    )
    assert "typer" in loaded
    assert "torch" not in loaded


LAZY = ("sympy", "cryptography", "prometheus_client", "fedptr.nodes.secure", "fedptr.nodes.secagg")
"""What an idle node must not have loaded: the meta kernels' sympy (~36 MiB), SecAgg with
`cryptography` (~8 MiB), the metrics endpoint's client (~1.4 MiB)."""


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_an_idle_node_loads_what_it_does_not_use_only_on_first_use(tmp_path: Path) -> None:
    """A started node, its private data loaded, has none of `LAZY` (no
    client in the process yet: the library's own meta inference loads sympy); its first op on
    private data loads the meta kernels on the offload thread, not the event loop, and is right."""
    probe = f"""
import asyncio, sys, threading
import numpy as np
import torch
from fedptr.nodes import guard
from fedptr.nodes.node import NodeConfig
from tests.harness import InprocCluster

warmed_on = []
real_warm_up = guard.warm_up
def recording_warm_up():
    warmed_on.append(threading.current_thread().name)
    real_warm_up()
guard.warm_up = recording_warm_up

async def main():
    np.savez("{tmp_path}/d.npz", x=np.arange(4.0))
    config = NodeConfig(data={{"d": "{tmp_path}/d.npz"}}, release_exact=True)
    shell = InprocCluster("inproc://lazy", {{"bob": config}}, 1.0, 3, 30.0)
    shell.start_broker()
    try:
        await shell.start_node("bob")
        loaded = sorted(m for m in {LAZY!r} if m in sys.modules)
        assert not loaded and not guard.is_warm() and not warmed_on, (loaded, warmed_on)
        async with shell.connect() as client:
            (x,) = await client.worker("bob").search("d")
            assert torch.equal(await (x + 1).get(), torch.arange(4.0, dtype=torch.float64) + 1)
        assert guard.is_warm() and warmed_on and threading.main_thread().name not in warmed_on, warmed_on
    finally:
        await shell._stop_all()
    print("ok")

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stderr[-3000:]


def test_the_node_routes_to_its_lazy_secure_handlers_exactly_what_they_handle() -> None:
    """nodes/node.py names the requests nodes/secure.py handles without importing it
    (`SECURE_REQUESTS`): the two lists must not drift apart."""
    from fedptr.nodes.node import SECURE_REQUESTS
    from fedptr.nodes.secure import SecureRounds

    unbuilt = SecureRounds.__new__(SecureRounds)  # handlers() reads no state: no node needed
    assert unbuilt.handlers().keys() == set(SECURE_REQUESTS)
