"""The allow-list of remote operations, shared by the client (to name them) and the node (to run them).

Every name is a method of `torch.Tensor` (the node calls ``torch.Tensor.<name>(first, *rest)``)
except the few in TORCH_FUNCTIONS, which run as ``torch.<name>``, the FUNCTIONAL ones, which run
as ``torch.nn.functional.<name>`` under the op name ``"F.<name>"``, and the special operations
below, each with its own kernel on the node. Nothing outside these sets is ever looked up by name.

Values that msgpack cannot carry travel as tagged values the node decodes (`DTYPE_PREFIX`,
`DEVICE_PREFIX`; in an index, `SLICE_KEY` and `ELLIPSIS_KEY`).
"""

from __future__ import annotations

ARITHMETIC = (
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "neg",
    "abs", "matmul", "mm", "bmm", "dot", "outer", "maximum", "minimum",
    "__radd__", "__rsub__", "__rmul__", "__rtruediv__", "__rmatmul__", "__rpow__",
    "__rfloordiv__", "__rmod__",
)  # fmt: skip
COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not")
REDUCTIONS = (
    "sum", "mean", "prod", "amax", "amin", "argmax", "argmin", "std", "var", "norm", "all", "any",
    "cumsum", "logsumexp", "max", "min",
)  # fmt: skip
RESHAPING = (
    "reshape", "view", "flatten", "squeeze", "unsqueeze", "t", "transpose", "permute",
    "contiguous", "clone", "expand", "repeat", "flip", "narrow", "index_select", "diagonal",
    "gather", "masked_fill", "masked_select", "nonzero", "tril", "triu",
)  # fmt: skip
ELEMENTWISE = (
    "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "square", "sin", "cos", "tanh", "sigmoid",
    "relu", "clamp", "floor", "ceil", "round", "sign", "reciprocal", "softmax", "log_softmax",
)  # fmt: skip
CONVERSIONS = ("float", "double", "half", "bfloat16", "int", "long", "bool", "to", "detach", "type_as")
TORCH_FUNCTIONS = ("cat", "stack", "where", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like")
FUNCTIONAL = (
    "relu", "softmax", "log_softmax", "linear", "gelu", "sigmoid", "tanh", "leaky_relu", "elu", "silu",
    "dropout", "nll_loss", "cross_entropy", "mse_loss", "l1_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "one_hot", "normalize", "pad", "conv1d", "conv2d", "max_pool2d",
    "avg_pool2d", "embedding", "layer_norm",
)  # fmt: skip
"""``torch.nn.functional`` names; their op name is ``"F." + name``."""
IN_PLACE = ("add_", "sub_", "mul_", "div_", "zero_", "addcmul_", "addcdiv_", "copy_", "fill_", "clamp_")
"""In-place updates; they run under torch.no_grad(), as an optimizer's step does."""
INDEXING = ("getitem", "setitem")
"""``getitem(t, *index)`` is ``t[index]``; ``setitem(t, value, *index)`` is ``t[index] = value``
(in place, under no_grad), its result the updated tensor."""
AUTOGRAD = ("backward", "grad", "zero_grad", "requires_grad_", "set_grad", "set_data")
"""``backward`` fills gradients (its result is an empty tensor), ``grad`` is a tensor's gradient,
``zero_grad`` drops it, ``requires_grad_`` turns gradient tracking on, ``set_grad(t, g)`` and
``set_data(t, d)`` assign ``t.grad`` and ``t.data`` (results: `t`)."""
NN = ("forward", "parameter", "cross_entropy", "mse_loss", "train", "state")
"""``forward(model, x)`` runs a stored model, ``parameter(model, i)`` is its i-th parameter,
``state(model, name)`` its parameter or buffer `name` (a state_dict key), ``train(model, mode)``
sets its training mode (result: an empty tensor); the losses are torch.nn.functional's."""
AGGREGATES = ("aggregate_mean",)
"""The DP mean of contributions, released by an aggregator worker only (nodes/mechanisms.py)."""

TENSOR_METHODS: frozenset[str] = frozenset(
    ARITHMETIC + COMPARISONS + REDUCTIONS + RESHAPING + ELEMENTWISE + CONVERSIONS
)
FUNCTIONAL_OPS: frozenset[str] = frozenset("F." + name for name in FUNCTIONAL)
ALLOWED: frozenset[str] = (
    TENSOR_METHODS | FUNCTIONAL_OPS | frozenset(TORCH_FUNCTIONS + IN_PLACE + INDEXING + AUTOGRAD + NN + AGGREGATES)
)
"""Every operation name a node accepts."""
MUTATING: frozenset[str] = frozenset((*IN_PLACE, "setitem", "set_grad", "set_data", "zero_grad", "requires_grad_"))
"""Operations that change their first argument; the client treats them as effects on it."""

DTYPE_PREFIX = "torch.dtype:"
"""A ``torch.dtype`` argument travels as this prefix and its wire name, e.g. ``"torch.dtype:float64"``."""
DEVICE_PREFIX = "torch.device:"
"""A ``torch.device`` argument travels as this prefix and the device type; only ``cpu`` is accepted."""
SLICE_KEY = "__slice__"
"""In an index: ``{SLICE_KEY: [start, stop, step]}`` is a slice."""
ELLIPSIS_KEY = "__ellipsis__"
"""In an index: ``{ELLIPSIS_KEY: True}`` is ``...``."""
