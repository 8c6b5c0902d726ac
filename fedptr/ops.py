"""The allow-list of remote operations, shared by the client (to name them) and the node (to run them).

Every name is a method of `torch.Tensor` (the node calls ``torch.Tensor.<name>(first, *rest)``)
except the few in TORCH_FUNCTIONS, which take a list of tensors first and run as ``torch.<name>``.
Nothing outside these sets is ever looked up by name.
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
    "cumsum", "logsumexp",
)  # fmt: skip
RESHAPING = (
    "reshape", "view", "flatten", "squeeze", "unsqueeze", "t", "transpose", "permute",
    "contiguous", "clone", "expand", "repeat", "flip", "narrow", "index_select", "diagonal",
)  # fmt: skip
ELEMENTWISE = (
    "exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "square", "sin", "cos", "tanh", "sigmoid",
    "relu", "clamp", "floor", "ceil", "round", "sign", "reciprocal", "softmax", "log_softmax",
)  # fmt: skip
CONVERSIONS = ("float", "double", "half", "bfloat16", "int", "long", "bool")
TORCH_FUNCTIONS = ("cat", "stack", "where")
IN_PLACE = ("add_", "sub_", "mul_", "div_", "zero_")
"""In-place updates; they run under torch.no_grad(), as an optimizer's step does."""
AUTOGRAD = ("backward", "grad", "zero_grad", "requires_grad_")
"""``backward`` fills gradients (its result is an empty tensor), ``grad`` is a tensor's gradient,
``zero_grad`` drops it, ``requires_grad_`` turns gradient tracking on."""
NN = ("forward", "parameter", "cross_entropy", "mse_loss")
"""``forward(model, x)`` runs a stored model, ``parameter(model, i)`` is its i-th parameter;
the losses are torch.nn.functional's."""
AGGREGATES = ("aggregate_mean",)
"""The DP mean of contributions, released by an aggregator worker only (nodes/mechanisms.py)."""

TENSOR_METHODS: frozenset[str] = frozenset(
    ARITHMETIC + COMPARISONS + REDUCTIONS + RESHAPING + ELEMENTWISE + CONVERSIONS
)
ALLOWED: frozenset[str] = TENSOR_METHODS | frozenset(TORCH_FUNCTIONS + IN_PLACE + AUTOGRAD + NN + AGGREGATES)
"""Every operation name a node accepts."""
