"""Running one operation so that private values cannot steer anything the client sees.

On private (tainted) operands an operation first runs on torch's meta device: meta tensors
have shapes and dtypes but no values, so whatever the meta run produces, or refuses, is a
function of public facts only. A private value used as a size, an index or a count fails there
(a meta tensor cannot become a Python number), and the refusal names no value. The real run
then computes the value; if it fails for a reason the meta run could not see (a private class
index out of range, an integer division by a private zero), or gives another shape, dtype or
requires_grad than the meta run's, the result is zeros of the meta shape instead of an error,
so success itself tells nothing. The result stays private either way.

The zeros must also be indistinguishable from the real result to autograd, as far as a client
can look: the meta run's stand-ins require grad as the operands do (under the caller's grad
mode), so it tells whether each result requires grad, and the zeros come from `_Zeros`, whose
backward gives each gradient-tracking operand a zero gradient and which, when the meta graph
saved tensors, saves one, so that a second backward without retain_graph fails as the real
one would. Plain zeros, without a graph, made a later backward fail in the world whose labels
were out of range only (docs/REDTEAM.md, thirteenth round). For the same reason what a private
op's graph saves for backward is charged (nodes/saved.py) at what the meta run's graph saved,
each storage once: the real run's depends on values (a failed run saved part of a graph).

The meta run is a function of public facts only, so its outcome is kept by those facts
(`_META`: the op, the grad mode, its tensors' shapes, dtypes and requires_grad, every other
argument exactly): a private op met before with the same signature takes its results' shapes,
dtypes, requires_grad and saved bytes from the table instead
of a new meta run (tens of µs each). Only successes are kept; a refusal is decided anew.

Every result is a fresh storage unless aliasing is what the operation is for (`ALIASING`), so a
stored value never shares memory with another entry behind the policy's back. Nor does a private
operation write anything but a mutating operation's target: a meta run that writes another
operand (its version counter moves) is refused before the real run.

Nor may a private run move what a client can see through torch's default generator, from which
the client draws (``rand_like``, ``randn_like``, dropout) and fetches what it drew on public
tensors: a forward on private data draws from a generator state of its own (`own_draws`),
seeded from the OS, and leaves the client's where it was. A model's dropout after a layer that
failed on private values (an `Embedding` index out of range: zeros stand in) drew nothing, so
the client's next public draw told the worlds apart (docs/REDTEAM.md, fifteenth round).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from fedptr import limits
from fedptr.errors import InvalidArgumentError
from fedptr.opinfo import REGISTRY
from fedptr.ops import ALIASING, MUTATING, STRUCTURAL

from . import kernels, saved


def check_results(op: str, count: int) -> None:
    """Refuse (InvalidArgumentError) `count` results of `op` when it gives one, or more than
    `limits.MAX_OP_RESULTS`."""
    if REGISTRY[op].outputs == 1:
        raise InvalidArgumentError(f"{op} gives one result, not {count}")
    if not 1 <= count <= limits.MAX_OP_RESULTS:
        raise InvalidArgumentError(f"an operation gives 1 to {limits.MAX_OP_RESULTS} results, not {count}")


_warming = threading.Lock()
_warm = False
"""Whether this process's meta kernels are loaded (`warm_up`)."""


def is_warm() -> bool:
    """Whether a meta run is cheap now: until `warm_up`, the first one loads sympy (~36 MiB of
    RSS, ~0.3 CPU seconds) and must not run on the event loop."""
    return _warm


def warm_up() -> None:
    """Load what torch's Python meta kernels need on their first call (sympy, imported by its
    dtype promotion rule) without torch._dynamo (see `_compile_guards_off`); safe from any
    thread, once. A node does it on its offload thread before its first op on private data
    (nodes/compute.py): an idle node never pays its memory, and heartbeats keep flowing while
    it loads (the loop's longest stall measured during it: 24-27 ms, the GIL changing hands
    every 5 ms). The launcher does it before it forks, so forked nodes share it."""
    global _warm
    with _warming:
        if _warm:
            return
        _compile_guards_off()
        (torch.empty(1, device="meta") * 2).sum()
        _warm = True


def _compile_guards_off() -> None:
    """Keep torch's Python meta kernels from importing torch._dynamo (~40 MiB of RSS and ~1.5 CPU
    seconds in every node that runs an op on private data).

    torch wraps those kernels (its ``_refs``: ``mul``, ``add``, ``relu``...) in
    ``torch._disable_dynamo``, whose wrapper imports torch._dynamo on its first call to build a
    "do not trace this under torch.compile" version of the kernel, and caches it on the kernel as
    ``__dynamo_disable``. A node never compiles (nothing under fedptr calls torch.compile), so
    the kernel itself is that version: cached here before the first call, the import never
    happens. Kernels reached another way (some loss functions) still import it when first used.
    If a torch release reshapes these wrappers, nothing is found and the node only pays the
    import again (tests/test_imports.py notices)."""
    # torch's own, which the first meta op loads anyway; the last fills the tables read below
    import torch._compile
    import torch._decomp
    import torch._meta_registrations

    wrapper_code = torch._compile._disable_dynamo(lambda: None).__code__
    seen: set[int] = set()
    todo: list[Any] = [
        kernel
        for table in ("meta", "post_autograd", "pre_autograd")  # those torch registers as meta kernels
        for kernel in torch._decomp.global_decomposition_table[table].values()
    ]
    while todo:  # each kernel's layers of wrappers, through their closures
        fn = todo.pop()
        if id(fn) in seen or not hasattr(fn, "__code__"):
            continue
        seen.add(id(fn))
        cells = dict(zip(fn.__code__.co_freevars, map(_contents, fn.__closure__ or ()), strict=True))
        if fn.__code__ is wrapper_code and getattr(cells["fn"], "__dynamo_disable", None) is None:
            cells["fn"].__dynamo_disable = cells["fn"]
        todo.extend(v for v in cells.values() if callable(v))


def _contents(cell: Any) -> Any:
    """What a closure cell holds (None while it is still empty)."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """`t` on the meta device: its shape, dtype and whether it requires grad (so the meta run
    builds the graph the real run would, and saves for backward what it would)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta", requires_grad=t.requires_grad)


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _stand_in(value)
    if isinstance(value, list | tuple):  # the lean loop hands a plan step's operands as a tuple
        return [_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _meta_forward(model: nn.Module, inputs: list[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A forward's meta run, and its stand-ins: the inputs', then the model state's."""
    state = {n: _stand_in(t) for n, t in model.state_dict(keep_vars=True).items()}
    meta_inputs = [_meta(x) for x in inputs]
    out: torch.Tensor = functional_call(model, state, tuple(meta_inputs))
    return out, [*_tensors(meta_inputs), *state.values()]


def meta_result(op: str, args: list[Any], kwargs: dict[str, Any]) -> kernels.Result | None:
    """The result of `op` on meta stand-ins for its tensors (None for structural ops). Raises
    whatever torch raises: a refusal that depends on shapes, dtypes and public arguments only."""
    if op in STRUCTURAL:
        return None
    return _meta_run(op, args, kwargs)[0]


def _meta_run(op: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[kernels.Result, int, tuple[int, ...]]:
    """`meta_result` of a non-structural op, the bytes its graph saves for backward (each
    storage once, as `nodes.saved.Recorder` counts a real run's) and which of the tensors it
    reads (by position in `_operands` order) it saves: the stand-ins require grad as the
    operands do, under the caller's grad mode."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()  # a meta storage has no data pointer, but its own C object
        storages[storage._cdata] = storage.nbytes()

    with torch.autograd.graph.saved_tensors_hooks(pack, _never):
        result, stand_ins = _meta_call(op, args, kwargs)
    saved = tuple(i for i, t in enumerate(stand_ins) if t.untyped_storage()._cdata in storages)
    return result, sum(storages.values()), saved


def _never(_: None) -> torch.Tensor:
    raise AssertionError("nothing runs a meta graph's backward")


def _meta_call(op: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[kernels.Result, list[torch.Tensor]]:
    """The meta run, and its stand-ins for the tensors it reads (in `_operands` order)."""
    if not _warm:  # a cold node's first: nodes/compute.py and the DP handlers call this off the loop
        warm_up()
    if op == "forward":
        if not args or not isinstance(args[0], nn.Module) or kwargs:
            raise TypeError("forward takes a model and its inputs by position")
        return _meta_forward(args[0], args[1:])
    meta_args, meta_kwargs = _meta(args), _meta(kwargs)
    stand_ins = _tensors(meta_args, meta_kwargs.values())
    if any(t.device.type != "meta" for t in stand_ins):
        # a container `_meta` does not know would hand the op real values: its "meta" run
        # would then give the real, value-dependent result (a plan's nonzero did)
        raise TypeError(f"{op} has an operand the meta run cannot stand in for")
    # what the op may write: a mutating op its target (args[0]), any other op nothing
    watched = _tensors(meta_args[1:] if op in MUTATING else meta_args, meta_kwargs.values())
    versions = [t._version for t in watched]
    result = kernels.run(op, meta_args, meta_kwargs)
    if any(t._version != v for t, v in zip(watched, versions, strict=True)):
        # a write the policy cannot see (as F.embedding's max_norm was): the real run would
        # change an operand whose taint nothing grows, or read-only private data
        raise TypeError(f"{op} writes into an operand it does not own")
    return result, stand_ins


def _operands(args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an op reads: its arguments' (`_tensors`), then a model's state (a forward)."""
    state = (t for v in args if isinstance(v, nn.Module) for t in v.state_dict(keep_vars=True).values())
    return [*_tensors(args, kwargs.values()), *state]


def _tensors(*values: Iterable[Any]) -> list[torch.Tensor]:
    """The tensors in `values`, nested in lists and dicts."""
    found: list[torch.Tensor] = []
    todo = [v for vs in values for v in vs]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, list | tuple):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
    return found


Signature = tuple[Any, ...]


class Meta(NamedTuple):
    """What a meta run decides, all of it public: each result's shape, dtype and whether it
    requires grad, and what its graph saves for backward (bytes, and which operands)."""

    results: tuple[tuple[torch.Size, torch.dtype, bool], ...]
    saved: int
    operands: tuple[int, ...]
    """The tensors read that its graph saves, by position in `_operands` order."""


_META: dict[Signature, Meta] = {}
"""The meta run's results by `_signature`, up to `limits.GUARD_META_TABLE_SIZE`."""


class _Unkeyed(Exception):
    """An argument the table cannot key exactly (a model: its meta run reads its state)."""


def _signature(op: str, args: list[Any], kwargs: dict[str, Any], count: int) -> Signature | None:
    """Everything the meta run of a call reads (and the results it must give), as a key; None
    when it reads more (a model)."""
    try:  # (the lean loop hands a tuple)
        return (op, count, torch.is_grad_enabled(), _key(list(args)), _key(kwargs))
    except _Unkeyed:
        return None


def _key(value: Any) -> Any:
    """`value` as the meta run sees it: a tensor by its shape, dtype and whether it requires
    grad, any other leaf by its
    type and value (``1``, ``1.0`` and ``True`` steer torch differently; a float by its bits,
    so that ``-0.0`` is not ``0.0``)."""
    t = type(value)
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, tuple(value.shape), value.dtype, value.requires_grad)
    if t is list:
        return (list, *[_key(v) for v in value])
    if t is dict:
        return (dict, *[(k, _key(v)) for k, v in value.items()])
    if t is float:
        return (float, value.hex())
    if t in (int, bool, str, type(None), torch.dtype, torch.device):
        return (t, value)
    raise _Unkeyed


def _meta_of(
    op: str, args: list[Any], kwargs: dict[str, Any], count: int, refuse: Callable[[], Exception]
) -> Meta | None:
    """What the meta run decides of `op` with `count` results (None for a structural op), from
    `_META` when this signature ran before; raises `refuse()` when the meta run fails or gives
    another number of results."""
    if op in STRUCTURAL:
        return None
    signature = _signature(op, args, kwargs, count)
    known = _META.get(signature) if signature is not None else None
    if known is not None:
        return known
    try:
        result, saved, operands = _meta_run(op, args, kwargs)
        results = tuple((m.shape, m.dtype, m.requires_grad) for m in kernels.results(result, count))
        known = Meta(results, saved, operands)
    except Exception:
        raise refuse() from None
    if signature is not None and len(_META) < limits.GUARD_META_TABLE_SIZE:
        _META[signature] = known
    return known


def run(
    op: str, args: list[Any], kwargs: dict[str, Any], private: bool, refuse: Callable[[], Exception], count: int = 1
) -> tuple[torch.Tensor, ...]:
    """Run `op`, which gives `count` results. With `private` operands, through the meta run
    first; `refuse()` is raised when the meta run (or a structural op) fails, or gives another
    number of results (a count decided by shapes and arguments, so public). No result aliases an
    operand unless `op` is in `ALIASING`."""
    if private:
        meta = _meta_of(op, args, kwargs, count, refuse)
        if meta is None:
            try:
                outputs = kernels.results(kernels.run(op, args, kwargs), count)
            except Exception:
                raise refuse() from None
        else:
            outputs = _private(op, args, kwargs, count, meta)
    else:
        value = kernels.run(op, args, kwargs)
        if count == 1 and type(value) is torch.Tensor:  # the common case, kept lean: it runs per op
            return (value if op in ALIASING else unshared(value, args, kwargs),)
        outputs = kernels.results(value, count)
    if op in ALIASING:
        return outputs
    return tuple(unshared(r, args, kwargs) for r in outputs)


def _private(op: str, args: list[Any], kwargs: dict[str, Any], count: int, meta: Meta) -> tuple[torch.Tensor, ...]:
    """The real run of a private, non-structural `op`, or `_Zeros` when it fails for a reason the
    meta run could not see (a private class index out of range, an integer division by a private
    zero) or gives other results than the meta run's (a shape that depends on values). What its
    graph saves for backward is charged at the meta run's bytes (`saved.Held`): the real run's
    (a failed one's partial graph) may depend on values; the operands it saves, per storage."""
    with saved.Held() as held, own_draws() if op == "forward" else contextlib.nullcontext():
        try:
            outputs: tuple[torch.Tensor, ...] | None = kernels.results(kernels.run(op, args, kwargs), count)
        except Exception:
            outputs = None
        if outputs is None or any(
            (r.shape, r.dtype, r.requires_grad) != m for r, m in zip(outputs, meta.results, strict=True)
        ):
            held.drop()  # the real run's graph is not kept
            outputs = _zeros(meta, args, kwargs)
    saves = _operands(args, kwargs) if meta.operands else []
    held.charge(meta.saved, [saves[i] for i in meta.operands])
    return outputs


@contextlib.contextmanager
def own_draws() -> Iterator[None]:
    """Within: torch's default generator draws from a state seeded from the OS; after the last
    such window closes: it is back where it was. For a run on private data whose draws (a
    model's dropout) depend on the values: a layer that fails on them before a dropout, a DP-SGD
    batch computed again sample by sample. Only forwards need it: a single random op
    (``rand_like``, ``F.dropout``) draws by its shapes alone.

    The generator is the process's, and such runs overlap (two offload threads, and a forward
    inline on the loop). The client's state is saved when the first window opens and put back
    when the last one closes; a window closing while others are open seeds a fresh state
    instead. Each window restoring what it saved put the client's state back while another run
    still drew: that run advanced it by as many draws as its data made, and a third window
    opened then saved that state and restored it last (red17). A public draw on the loop or
    another thread while a window is open draws from an OS-seeded state, and does not advance
    the client's (timing, as with any concurrent use)."""
    generator = torch.default_generator
    with _DRAWS:
        global _open, _clients  # the process has one default generator: its windows are the process's
        if not _open:
            _clients = generator.get_state()
        _open += 1
        generator.manual_seed(secrets.randbits(63))
    try:
        yield
    finally:
        with _DRAWS:
            _open -= 1
            if _open:
                generator.manual_seed(secrets.randbits(63))
            else:
                generator.set_state(_clients)


_DRAWS = threading.Lock()
"""Guards `_open` and `_clients`; held only to read, seed or set the generator's state."""
_open = 0
"""How many `own_draws` windows are open, on any thread."""
_clients = torch.empty(0, dtype=torch.uint8)
"""The client's generator state, saved when the first open window opened."""


def _zeros(meta: Meta, args: list[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Zeros of the meta run's results; through `_Zeros` when one requires grad."""
    if not any(grad for *_, grad in meta.results):
        return tuple(torch.zeros(shape, dtype=dtype) for shape, dtype, _ in meta.results)
    operands = _operands(args, kwargs)
    tracking = {id(v): v for v in operands if v.requires_grad}  # (a model's parameters are in its state)
    saves = [operands[i] for i in meta.operands]
    outputs: tuple[torch.Tensor, ...] = _Zeros.apply(meta, saves, *tracking.values())  # type: ignore[no-untyped-call]
    return outputs


class _Zeros(torch.autograd.Function):
    """Zeros standing in for a private op's results, with the graph the real results would
    have, as far as a client can tell: each result requires grad as the meta run's does (so
    also `is_leaf`), a backward gives every operand that tracks gradients (a model's parameters
    too) a zero gradient of its shape and dtype, and when the meta run's graph saved tensors
    this one saves the operands it saved (a write into one before the backward fails it, as
    the real graph's check does), or else an empty tensor; a backward without retain_graph frees
    them: a second backward then fails, as through the real graph. Without it the zeros had no
    graph, and a backward through them failed in the world whose private labels were out of
    range only (docs/REDTEAM.md)."""

    @staticmethod
    def forward(ctx: Any, meta: Meta, saves: list[torch.Tensor], *tracking: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype, _ in meta.results)
        ctx.mark_non_differentiable(*(r for r, (*_, grad) in zip(outputs, meta.results, strict=True) if not grad))
        ctx.operands = [(t.shape, t.dtype) for t in tracking]
        if saves:  # the operands the real graph saves: written in place before the backward, it fails
            ctx.save_for_backward(*saves)
        elif meta.saved:  # not a result: one saved through the hooks would hold its own graph (a cycle)
            ctx.save_for_backward(torch.empty(0))
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018 (freed by a backward without retain_graph: a second one fails here)
        return (None, None, *(torch.zeros(shape, dtype=dtype) for shape, dtype in ctx.operands))


def unshared(result: torch.Tensor, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """`result`, copied when it shares storage with an operand (or with another stored value),
    or when it is empty yet holds a storage: an empty view (``x[0:0]``) shares no element but
    keeps its base's whole storage alive, which the store would charge at 0 bytes.

    Shared means: any tensor among the operands (nested in lists, tuples and dicts), a leaf's
    gradient, or a model's parameter has its data at the result's storage. One loop over a
    worklist, not a recursive helper: it runs for every op, whose operands are nearly always a
    flat list of tensors (a call less per op)."""
    if not result.numel():
        return result.clone() if result.untyped_storage().nbytes() else result
    storage = result.untyped_storage().data_ptr()
    todo: list[Iterable[Any]] = [args, kwargs.values()] if kwargs else [args]
    while todo:
        for v in todo.pop():
            if isinstance(v, torch.Tensor):
                if v.untyped_storage().data_ptr() == storage:
                    return result.clone()
                grad = v.grad if v.is_leaf or v.retains_grad else None  # a non-leaf has none (and torch warns)
                if grad is not None and grad.untyped_storage().data_ptr() == storage:
                    return result.clone()  # `grad` hands out a copy of the gradient, never the live one
            elif isinstance(v, nn.Module):
                todo.append(v.parameters())
            elif isinstance(v, list | tuple):
                todo.append(v)
            elif isinstance(v, dict):
                todo.append(v.values())
    return result
