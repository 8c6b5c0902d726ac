"""Any `nn.Module` as a checked graph: captured on the client with `torch.fx`, sent as plain data,
rebuilt on the node only after every step of it was checked against the allow-list.

A model whose type is not in `modules.LAYERS` (``class Net(nn.Module)`` with a ``forward``, or a
`Sequential` holding a layer outside the list) is traced symbolically: the layers of
`modules.LAYERS` stay whole (their specs travel as for a `Sequential`), and everything else its
``forward`` does becomes steps, each naming an allow-listed function (``F.relu``, ``torch.flatten``,
``operator.add``...), tensor method (``view``, ``sum``...), layer, or parameter. The spec is
plain data::

    {"type": "Graph",
     "tree": {"children": [[name, subtree | {"layer": layer_spec}]...],
              "parameters": [[name, shape, dtype, requires_grad]...], "buffers": [[name, shape, dtype]...]},
     "steps": [[op, target, args, kwargs]...]}

``args`` and ``kwargs`` hold numbers, strings, None, ``{"step": i}`` (the result of an earlier
step), ``{"tuple": [...]}``, and the tagged values of `fedptr.ops` (dtypes, slices, ``...``).

The node never executes code from a graph: `GraphModel` *interprets* its steps, each looked up by
name in a fixed table, and refuses any step that writes (in-place methods, ``inplace=True``,
``out=``, F.embedding's ``max_norm``, by keyword or by position): a forward may not change a
parameter. Data-dependent control flow cannot be traced
and is refused on the client, naming the line that needs a value (`UnsupportedTypeError`).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from fedptr import limits, ops
from fedptr.errors import UnsupportedTypeError
from fedptr.opinfo import REGISTRY, Call
from fedptr.tensors import DTYPE_BY_NAME, dtype_name
from fedptr.torchops import TORCH

GRAPH = "Graph"
"""The spec ``type`` of a model that travels as a graph."""

OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "getitem")
"""Python operators a graph may apply (``x + y``, ``x[0]``...)."""
GRAPH_METHODS = ("size", "dim")
"""Methods a graph may call besides the allow-listed tensor methods: they read shapes only."""
READABLE = frozenset({"shape", "dtype", "ndim"})
"""Tensor attributes a graph may read (``x.shape[0]``), as the function ``getattr``."""


def _read(value: Any, name: str) -> Any:
    if name not in READABLE:
        raise ValueError(f"a model graph reads only {', '.join(sorted(READABLE))}, not {name!r:.40}")
    return getattr(value, name)


def _functions() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {f"operator.{n}": getattr(operator, n) for n in OPERATORS}
    table["getattr"] = _read
    for name, info in REGISTRY.items():
        if info.call is Call.FUNCTIONAL and name.startswith("F."):
            table[name] = TORCH[name]
        elif info.call in (Call.TORCH, Call.METHOD) and not info.mutating:
            fn = getattr(torch, info.target, None)
            if callable(fn) and not name.startswith("_"):
                table[f"torch.{name}"] = fn
    return table


FUNCTIONS: dict[str, Callable[..., Any]] = _functions()
"""Every function a graph step may call, by the name it travels under."""
_NAME_OF: dict[int, str] = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS: frozenset[str] = ops.TENSOR_METHODS | frozenset(GRAPH_METHODS)
"""Tensor methods a graph step may call: none of them writes to its tensor."""
_OPS = ("input", "function", "method", "module", "attr", "output")


def is_layer(module: nn.Module) -> bool:
    """Whether `module` travels whole, as a layer spec (not traced through)."""
    from fedptr.modules import LAYERS

    layer = LAYERS.get(type(module).__name__)
    return layer is not None and layer.cls is type(module) and layer.cls is not nn.Sequential


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_layer(m)


# --- the client: capture -------------------------------------------------------------------------


def capture(module: nn.Module) -> dict[str, Any]:
    """The graph spec of `module`. Raises UnsupportedTypeError naming what cannot travel: an
    operation outside the allow-list, a write in the forward, control flow on values, a layer
    setting that cannot be sent."""
    if isinstance(module, GraphModel):
        return module.spec
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for what it cannot trace
        raise UnsupportedTypeError(f"{type(module).__name__} cannot travel as a graph: its forward {_why(e)}") from None
    index: dict[torch.fx.Node, int] = {}
    steps: list[list[Any]] = []
    for node in graph.nodes:
        index[node] = len(steps)
        steps.append(_step(module, node, index))
    return {"type": GRAPH, "tree": _tree(module, 0), "steps": steps}


def _why(e: Exception) -> str:
    text = str(e).split("\n")[0]
    if "symbolically traced variables cannot be used as inputs to control flow" in text:
        return "branches or loops on a value (data-dependent control flow), which a graph cannot hold"
    return f"could not be traced ({type(e).__name__}: {text[:200]})"


def _step(root: nn.Module, node: torch.fx.Node, index: dict[torch.fx.Node, int]) -> list[Any]:
    args, kwargs = [_plain(a, index) for a in node.args], _plain(node.kwargs, index)
    where = f"{type(root).__name__}.forward ({node.name})"
    if node.op == "placeholder":
        return ["input", str(node.target), [], {}]
    if node.op == "output":
        return ["output", "", args, {}]
    if node.op == "call_module":
        return ["module", str(node.target), args, kwargs]
    if node.op == "get_attr":
        target = str(node.target)
        if not _is_state(root, target):
            raise UnsupportedTypeError(
                f"{where}: {target} is a plain tensor attribute; register it as a parameter or buffer to send it"
            )
        return ["attr", target, [], {}]
    if node.op == "call_method":
        name = str(node.target)
        if name not in METHODS:
            raise UnsupportedTypeError(f"{where} calls the tensor method {name!r}, which is not allowed in a model")
        return _out_of_place(where, ["method", name, args, kwargs])
    if node.target is getattr:
        if len(args) != 2 or args[1] not in READABLE:
            raise UnsupportedTypeError(f"{where} reads .{args[1:2]}, which a model may not (only {sorted(READABLE)})")
        return ["function", "getattr", args, kwargs]
    name_of = _NAME_OF.get(id(node.target))
    if name_of is None:
        name = f"{getattr(node.target, '__module__', None) or ''}.{getattr(node.target, '__name__', node.target)}"
        raise UnsupportedTypeError(f"{where} calls {name.strip('.')}, which is not allowed in a model (see fedptr.ops)")
    return _out_of_place(where, ["function", name_of, args, kwargs])


def _out_of_place(where: str, step: list[Any]) -> list[Any]:
    """`step`, refused when it writes in place (``inplace=True``, ``out=``): the node would refuse
    the graph, after the client had sent it, as a ValueError of the next await on that worker."""
    if _writes(*step):
        raise UnsupportedTypeError(
            f"{where} calls {step[1]} writing in place (inplace=True, out=, F.embedding's max_norm), "
            "which a forward may not: compute out of place"
        )
    return step


def _is_state(root: nn.Module, target: str) -> bool:
    owner, _, attr = target.rpartition(".")
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        return False
    return attr in module._parameters or attr in module._buffers


def _plain(value: Any, index: dict[torch.fx.Node, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"step": index[value]}
    if isinstance(value, tuple):
        return {"tuple": [_plain(v, index) for v in value]}
    if isinstance(value, list):
        return [_plain(v, index) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, index) for k, v in value.items()}
    if isinstance(value, slice):
        return {ops.SLICE_KEY: [_plain(v, index) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {ops.ELLIPSIS_KEY: True}
    if isinstance(value, torch.dtype):
        return ops.DTYPE_PREFIX + str(value).removeprefix("torch.")
    if value is None or type(value) in (bool, int, float, str):
        return value
    raise UnsupportedTypeError(f"a {type(value).__name__} constant cannot travel in a model graph")


def _tree(module: nn.Module, depth: int) -> dict[str, Any]:
    from fedptr.modules import spec_of

    if depth > limits.MAX_MODULE_DEPTH:
        raise UnsupportedTypeError(f"modules nest deeper than {limits.MAX_MODULE_DEPTH}")
    if is_layer(module):
        return {"layer": spec_of(module)}
    if module._non_persistent_buffers_set:
        raise UnsupportedTypeError(f"{type(module).__name__}: non-persistent buffers cannot be sent")
    return {
        "children": [[name, _tree(child, depth + 1)] for name, child in module._modules.items() if child is not None],
        "parameters": [
            [name, list(p.shape), dtype_name(p.dtype), p.requires_grad]
            for name, p in module._parameters.items()
            if p is not None
        ],
        "buffers": [[name, list(b.shape), dtype_name(b.dtype)] for name, b in module._buffers.items() if b is not None],
    }


# --- the node: check and rebuild -----------------------------------------------------------------


class GraphModel(nn.Module):
    """A model rebuilt from a checked graph spec: its layers, parameters and buffers sit where the
    client's did (same `state_dict` keys), and `forward` interprets the steps."""

    def __init__(self, spec: dict[str, Any], count: list[int]) -> None:
        super().__init__()
        _fill(self, spec.get("tree"), 0, count)
        steps = _checked_steps(self, spec.get("steps"))
        self.spec = {"type": GRAPH, "tree": spec["tree"], "steps": steps}
        self.inputs = sum(1 for step in steps if step[0] == "input")

    def forward(self, *inputs: Any) -> Any:
        steps = self.spec["steps"]
        if len(inputs) != self.inputs:
            raise TypeError(f"this model's forward takes {self.inputs} inputs, not {len(inputs)}")
        values: list[Any] = list(inputs)
        for op, target, args, kwargs in steps[self.inputs :]:
            a, k = _resolve(args, values), _resolve(kwargs, values)
            if op == "output":
                return a[0]
            if op == "function":
                values.append(FUNCTIONS[target](*a, **k))
            elif op == "method":
                values.append(getattr(a[0], target)(*a[1:], **k))
            elif op == "module":
                values.append(self.get_submodule(target)(*a, **k))
            else:
                owner, _, attr = target.rpartition(".")
                values.append(getattr(self.get_submodule(owner), attr))
        raise ValueError("a model graph ends with its output")


def build(spec: dict[str, Any], count: list[int]) -> GraphModel:
    """The model a graph spec describes. Raises ValueError for anything outside the allow-list or
    its bounds; parameters and buffers are fresh (load them as for any model)."""
    try:
        return GraphModel(spec, count)
    except (KeyError, TypeError, AttributeError) as e:  # a name clash or a malformed spec
        raise ValueError(f"not a valid model graph: {e}") from None


def _name(value: Any) -> str:
    ok = type(value) is str and 0 < len(value) <= 64 and (value.isidentifier() or value.isdigit())
    if not ok or value.startswith("__"):
        raise ValueError(f"not a valid attribute name in a model graph: {value!r:.70}")
    return str(value)


def _fill(module: nn.Module, tree: Any, depth: int, count: list[int]) -> None:
    from fedptr.modules import build as build_layer

    if depth > limits.MAX_MODULE_DEPTH:
        raise ValueError(f"a model graph nests at most {limits.MAX_MODULE_DEPTH} deep")
    if type(tree) is not dict:
        raise ValueError("a model graph's tree must be a dict")
    for name, shape, dtype, requires_grad in _rows(tree.get("parameters"), 4):
        if type(requires_grad) is not bool:
            raise ValueError("a graph parameter's requires_grad must be a bool")
        empty = _empty(shape, dtype)
        module.register_parameter(_name(name), nn.Parameter(empty, requires_grad=requires_grad))
    for name, shape, dtype in _rows(tree.get("buffers"), 3):
        module.register_buffer(_name(name), _empty(shape, dtype))
    for name, sub in _rows(tree.get("children"), 2):
        count[0] += 1
        if count[0] > limits.MAX_MODULE_LAYERS:
            raise ValueError(f"a model may have at most {limits.MAX_MODULE_LAYERS} layers")
        if type(sub) is dict and "layer" in sub:
            child = build_layer(sub["layer"], depth + 1, count)
        else:
            child = nn.Module()
            _fill(child, sub, depth + 1, count)
        module.add_module(_name(name), child)


def _rows(value: Any, width: int) -> list[list[Any]]:
    if value is None:
        return []
    if type(value) is not list or any(type(v) is not list or len(v) != width for v in value):
        raise ValueError(f"a model graph's tree lists rows of {width}")
    return value


def _empty(shape: Any, dtype: Any) -> torch.Tensor:
    """An uninitialised tensor to load a parameter or buffer into, within the bounds."""
    if type(shape) is not list or len(shape) > 8 or any(type(n) is not int or n < 0 for n in shape):
        raise ValueError(f"not a tensor shape: {shape!r:.60}")
    if dtype not in DTYPE_BY_NAME:
        raise ValueError(f"not a dtype: {dtype!r:.60}")
    if torch.Size(shape).numel() > limits.MAX_GRAPH_TENSOR_NUMEL:
        raise ValueError(f"a model graph's tensors hold at most {limits.MAX_GRAPH_TENSOR_NUMEL} elements each")
    return torch.empty(shape, dtype=DTYPE_BY_NAME[dtype])


def _checked_steps(model: GraphModel, steps: Any) -> list[tuple[str, str, list[Any], dict[str, Any]]]:
    """`steps`, each checked: a known op and target, arguments that refer to earlier steps only,
    no write; the last one the output."""
    if type(steps) is not list or not 1 <= len(steps) <= limits.MAX_GRAPH_STEPS:
        raise ValueError(f"a model graph has 1 to {limits.MAX_GRAPH_STEPS} steps")
    layers = {name for name, m in model.named_modules() if is_layer(m)}
    state = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    checked = []
    inputs = sum(1 for step in steps if type(step) is list and step[:1] == ["input"])
    for i, step in enumerate(steps):
        if type(step) is not list or len(step) != 4 or step[0] not in _OPS or type(step[1]) is not str:
            raise ValueError(f"step {i} of a model graph is not [op, target, args, kwargs]")
        op, target, args, kwargs = step
        if type(args) is not list or type(kwargs) is not dict:
            raise ValueError(f"step {i}: args must be a list and kwargs a dict")
        if (op == "input") != (i < inputs):
            raise ValueError("a model graph's inputs come first")
        if not _known(op, target, args, kwargs, layers, state) or (op == "output" and i != len(steps) - 1):
            raise ValueError(f"step {i} of a model graph ({op} {target!r:.60}) is not allowed")
        if _writes(op, target, args, kwargs):
            raise ValueError(f"step {i} of a model graph ({target}) writes in place: a forward may not")
        _check_value([args, kwargs], i, 0)
        checked.append((op, target, args, kwargs))
    if checked[-1][0] != "output":
        raise ValueError("a model graph ends with its output")
    return checked


def _writes(op: str, target: str, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a step gives a parameter that writes into an argument (`ops.WRITING_KEYWORDS`),
    by keyword or, to a function, by position (F.relu's second, F.normalize's fifth)."""
    given = kwargs
    if op == "function" and target in FUNCTIONS:
        # a builtin has no signature (its `out` is keyword-only); a call that does not bind fails anyway
        with contextlib.suppress(TypeError, ValueError):
            given = inspect.signature(FUNCTIONS[target]).bind_partial(*args, **kwargs).arguments
    return any(given[k] is not None and given[k] is not False for k in ops.WRITING_KEYWORDS & given.keys())


def _known(op: str, target: str, args: list[Any], kwargs: dict[str, Any], layers: set[str], state: set[str]) -> bool:
    """Whether one step names something the node may run, with the arguments it needs."""
    if op == "input":
        return not args and not kwargs
    if op == "output":
        return len(args) == 1
    if op == "function":
        return target in FUNCTIONS and (target != "getattr" or (len(args) == 2 and args[1] in READABLE))
    if op == "method":
        return target in METHODS and len(args) >= 1
    return target in (layers if op == "module" else state)


def _check_value(value: Any, step: int, depth: int) -> None:
    if depth > limits.MAX_VALUE_DEPTH:
        raise ValueError(f"step {step} of a model graph nests too deep")
    if value is None or type(value) in (bool, int, float):
        return
    if type(value) is str:
        if value.startswith(ops.DTYPE_PREFIX) and _dtype(value) is None:
            raise ValueError(f"step {step}: unknown dtype {value!r:.60}")
        return
    if type(value) is list:
        for v in value:
            _check_value(v, step, depth + 1)
        return
    if type(value) is dict:
        if set(value) == {"step"}:
            ref = value["step"]
            if type(ref) is not int or not 0 <= ref < step:
                raise ValueError(f"step {step} of a model graph refers to a step not before it")
            return
        if set(value) == {ops.SLICE_KEY} and (type(value[ops.SLICE_KEY]) is not list or len(value[ops.SLICE_KEY]) != 3):
            raise ValueError(f"step {step}: a slice has three parts")
        for v in value.values():
            _check_value(v, step, depth + 1)
        return
    raise ValueError(f"step {step} of a model graph holds a {type(value).__name__}")


def _dtype(text: str) -> torch.dtype | None:
    value = getattr(torch, text.removeprefix(ops.DTYPE_PREFIX), None)
    return value if isinstance(value, torch.dtype) else None


def _resolve(value: Any, values: list[Any]) -> Any:
    if type(value) is list:
        return [_resolve(v, values) for v in value]
    if type(value) is dict:
        if "step" in value and len(value) == 1:
            return values[value["step"]]
        if "tuple" in value and len(value) == 1:
            return tuple(_resolve(v, values) for v in value["tuple"])
        if ops.SLICE_KEY in value and len(value) == 1:
            return slice(*_resolve(value[ops.SLICE_KEY], values))
        if ops.ELLIPSIS_KEY in value and len(value) == 1:
            return Ellipsis
        return {k: _resolve(v, values) for k, v in value.items()}
    if type(value) is str and value.startswith(ops.DTYPE_PREFIX):
        return _dtype(value)
    return value
