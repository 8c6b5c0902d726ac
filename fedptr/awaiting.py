"""A forgotten ``await``: the error for a coroutine handed where a value, a pointer or a worker
goes (`not_awaited`), and `Call`, what fedptr's value-returning calls (``p.get()``,
``p.item()``, ``worker.search(tag)``...) return: a coroutine that says so when it is used as its
value (``p.get() + 1``, ``p.item() > 0``, ``p.get().numpy()``) instead of Python's "unsupported
operand type(s) for +: 'coroutine' and 'int'". Apart from `fedptr.errors`, which the wire
protocol and the session import and which must stay sans-IO (tests/test_imports.py): this asks
asyncio for the running tasks."""

from __future__ import annotations

import asyncio
import functools
import inspect
import operator
from collections.abc import Callable, Coroutine, Generator
from types import CoroutineType
from typing import Any, NoReturn, ParamSpec, TypeVar

from fedptr.errors import NotAwaitedError

P = ParamSpec("P")
T = TypeVar("T")


def not_awaited(value: object, expected: str) -> NotAwaitedError | None:
    """The error for `value` given where `expected` is, when `value` is a coroutine (of
    ``p.get()``, ``worker.search(tag)``...): a forgotten ``await``. None for anything else. A
    coroutine that never started is closed, so Python's "coroutine ... was never awaited"
    warning does not repeat, later and without a way out, what this error says; unless a task
    was made of it, which runs it (closed, the task failed)."""
    if isinstance(value, Call):
        value.close_unstarted()
        name = value.name
    elif isinstance(value, CoroutineType):
        if _unstarted(value) and not _a_tasks(value):
            value.close()
        name = value.__qualname__
    else:
        return None
    return NotAwaitedError(
        f"expected {expected}, got {name}() not awaited: a fedptr call that returns a value or "
        f"hands an object over (get, move, item, search, objects, workers, dp.*) is awaited "
        f"first, as in `x = await p.get()` or `x, y = await bob.search('digits')`"
    )


def _unstarted(coro: CoroutineType[Any, Any, Any]) -> bool:
    return coro.cr_frame is not None and coro.cr_await is None and not coro.cr_running


def _a_tasks(coro: object) -> bool:
    """Whether a task of the running loop was made of `coro` (before it first ran): the task
    runs it, and it is not ours to close."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running: no task to run it
        return False
    return any(t.get_coro() is coro for t in tasks)


class Call(Coroutine[Any, Any, T]):
    """The coroutine of a fedptr call that returns a value: awaited, run as a task, gathered or
    passed to `asyncio.run` as any coroutine is. Used as the value instead (an operator, a
    comparison, indexing, ``len``, ``bool``, ``float``, ``iter``, a torch function, numpy, a
    format spec, an attribute), it raises NotAwaitedError (AttributeError for an attribute)
    saying to await it, and closes itself, so Python's "never awaited" warning does not follow
    the error; a call dropped without an await or an error still gets that warning. An
    attribute's error closes it only once it is dropped unawaited: reading one may be a probe
    (``hasattr``, a debugger), and the native coroutine's ``cr_*`` attributes are its own, so
    ``inspect.getcoroutinestate`` works and a later ``await`` runs the call.
    ``inspect.iscoroutine`` says False (it asks for Python's own coroutine type, which no class
    can extend); ``asyncio.iscoroutine`` and ``inspect.isawaitable`` say True."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        # A task steps its coroutine by `send`/`throw`: the coroutine's own methods, bound here
        # over the class's (which are for the Coroutine ABC and typing), add no Python frame. A
        # method's frame would be in an error's traceback, and its caller's (the loop's handle,
        # holding the task, holding the error) with it: a cycle, and the error, its pointers and
        # their remote objects would wait for the collector.
        for name in ("send", "throw", "close"):
            setattr(self, name, getattr(coro, name))

    @property
    def name(self) -> str:
        """The call's qualified name, e.g. ``Pointer.get``."""
        return str(getattr(self._coro, "__qualname__", "a coroutine"))

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def close_unstarted(self) -> None:
        """Close the coroutine if it never ran and no task will run it (see `not_awaited`)."""
        if isinstance(self._coro, CoroutineType) and _unstarted(self._coro) and not _a_tasks(self):
            self._coro.close()

    def __repr__(self) -> str:
        return f"<fedptr call {self.name}(): a coroutine, await it for its value>"

    def _misused(self, how: str) -> NoReturn:
        self.close_unstarted()
        raise NotAwaitedError(
            f"{how} on {self.name}() not awaited: it is a coroutine, not its value; await it "
            f"first, as in `(await p.get()) + 1` or `if await p.item() > 0:`"
        )

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("_"):  # a library's probe (numpy's __array_interface__, IPython's _repr_html_)
            raise AttributeError(name)
        # not closed here: a probe (``hasattr``, a debugger, a completer) may precede the await;
        # `__del__` closes a misused call that no one awaits, so no "never awaited" warning follows
        self._misused_attribute = True
        method = self.name.rpartition(".")[2]
        raise AttributeError(
            f"'{self.name}()' is a coroutine not awaited and has no attribute {name!r}: await it "
            f"first, as in `(await x.{method}(...)).{name}`"
        )

    _misused_attribute = False
    """Whether an attribute a value would have was read (``p.get().numpy()``)."""

    def __del__(self) -> None:
        if self._misused_attribute:
            self.close_unstarted()

    def __format__(self, spec: str) -> str:
        if spec:
            self._misused(f"format spec {spec!r}")
        return repr(self)

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> NoReturn:
        call = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Call))
        call._misused(f"{getattr(func, '__name__', func)}()")


def _operator(how: str) -> Callable[..., NoReturn]:
    def misused(self: Call[Any], *other: Any) -> NoReturn:
        self._misused(how)

    return misused


for _how, _names in {
    "bool()": ("bool",),
    "len()": ("len",),
    "iter()": ("iter",),
    "'in'": ("contains",),
    "indexing": ("getitem",),
    "item assignment": ("setitem",),
    "int()": ("int",),
    "float()": ("float",),
    "complex()": ("complex",),
    "using it as an index": ("index",),
    "numpy": ("array",),
    "'+'": ("add", "radd"),
    "'-'": ("sub", "rsub", "neg"),
    "'*'": ("mul", "rmul"),
    "'/'": ("truediv", "rtruediv"),
    "'//'": ("floordiv", "rfloordiv"),
    "'%'": ("mod", "rmod"),
    "'**'": ("pow", "rpow"),
    "'@'": ("matmul", "rmatmul"),
    "'&'": ("and", "rand"),
    "'|'": ("or", "ror"),
    "'^'": ("xor", "rxor"),
    "'<<'": ("lshift", "rlshift"),
    "'>>'": ("rshift", "rrshift"),
    "'<'": ("lt",),
    "'<='": ("le",),
    "'>'": ("gt",),
    "'>='": ("ge",),
    "unary '+'": ("pos",),
    "abs()": ("abs",),
    "'~'": ("invert",),
}.items():
    for _name in _names:
        setattr(Call, f"__{_name}__", _operator(_how))


for _attr in ("cr_running", "cr_suspended", "cr_frame", "cr_await", "cr_code", "cr_origin"):
    # a native coroutine's state, for inspect.getcoroutinestate and getcoroutinelocals, debuggers
    setattr(Call, _attr, property(operator.attrgetter(f"_coro.{_attr}")))


def awaited(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Call[T]]:
    """Make `fn`, an ``async def``, return its coroutine as a `Call`."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> Call[T]:
        return Call(fn(*args, **kwargs))

    # still a coroutine function to what asks (an autospec's mock of a Worker awaits `search`):
    # Python 3.12 marks one for inspect; 3.11's asyncio, which unittest.mock asks, reads its own mark
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        return mark(call)  # type: ignore[no-any-return]
    call._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return call
