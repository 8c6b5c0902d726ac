# mypy: disable-error-code="empty-body"
"""Typed stubs of `Pointer`'s registry methods and operators: generated, do not edit.

Regenerate with ``python -m fedptr.opinfo --stubs > fedptr/pointer_methods.py`` (tests/test_pointer_types.py
fails when this file is stale). `Pointer` inherits `PointerMethods` for type checkers only
(``if TYPE_CHECKING``): fedptr never imports this module at run time; the methods are the ones
``fedptr.pointer._install_methods`` installs from the same registry (`fedptr.opinfo`).

Arguments are `Any`: they are torch's own (docs/ops.md), checked where the op is issued (meta
inference) and by the worker. Results are precise: a `Pointer`, a pair of them for a two-result op
(``v, i = p.topk(3)``), a tuple for a number of results that depends on arguments and shapes
(``split``, ``chunk``, ``unbind``); ``max``/``min`` give a pair given a ``dim``, else one pointer;
an in-place op (and its ``+=`` operator) returns the pointer it changes.
``==`` and ``!=`` keep `Pointer`'s identity semantics (element-wise: `eq`, `ne`), so they are not here.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from fedptr.pointer import Pointer


class PointerMethods:
    """The methods and operators `Pointer` gets from the op registry, typed (type checkers only)."""

    __slots__ = ()

    def add(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.add`` (arithmetic)."""

    def __add__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.add`` (arithmetic)."""

    def sub(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sub`` (arithmetic)."""

    def __sub__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sub`` (arithmetic)."""

    def mul(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mul`` (arithmetic)."""

    def __mul__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mul`` (arithmetic)."""

    def div(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.div`` (arithmetic)."""

    def __truediv__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.div`` (arithmetic)."""

    def true_divide(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.true_divide`` (arithmetic)."""

    def floor_divide(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.floor_divide`` (arithmetic)."""

    def __floordiv__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.floor_divide`` (arithmetic)."""

    def remainder(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.remainder`` (arithmetic)."""

    def __mod__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.remainder`` (arithmetic)."""

    def fmod(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.fmod`` (arithmetic)."""

    def pow(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.pow`` (arithmetic)."""

    def __pow__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.pow`` (arithmetic)."""

    def neg(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.neg`` (arithmetic)."""

    def __neg__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.neg`` (arithmetic)."""

    def abs(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.abs`` (arithmetic)."""

    def __abs__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.abs`` (arithmetic)."""

    def matmul(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.matmul`` (arithmetic)."""

    def __matmul__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.matmul`` (arithmetic)."""

    def mm(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mm`` (arithmetic)."""

    def bmm(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.bmm`` (arithmetic)."""

    def dot(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.dot`` (arithmetic)."""

    def outer(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.outer`` (arithmetic)."""

    def maximum(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.maximum`` (arithmetic)."""

    def minimum(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.minimum`` (arithmetic)."""

    def __radd__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__radd__`` (arithmetic)."""

    def __rsub__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rsub__`` (arithmetic)."""

    def __rmul__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rmul__`` (arithmetic)."""

    def __rtruediv__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rtruediv__`` (arithmetic)."""

    def __rmatmul__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rmatmul__`` (arithmetic)."""

    def __rpow__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rpow__`` (arithmetic)."""

    def __rfloordiv__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rfloordiv__`` (arithmetic)."""

    def __rmod__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.__rmod__`` (arithmetic)."""

    def eq(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.eq`` (comparison)."""

    def ne(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.ne`` (comparison)."""

    def lt(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.lt`` (comparison)."""

    def __lt__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.lt`` (comparison)."""

    def le(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.le`` (comparison)."""

    def __le__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.le`` (comparison)."""

    def gt(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.gt`` (comparison)."""

    def __gt__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.gt`` (comparison)."""

    def ge(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.ge`` (comparison)."""

    def __ge__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.ge`` (comparison)."""

    def logical_and(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.logical_and`` (comparison)."""

    def logical_or(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.logical_or`` (comparison)."""

    def logical_not(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.logical_not`` (comparison)."""

    def __invert__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.logical_not`` (comparison)."""

    def sum(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sum`` (reduction)."""

    def mean(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mean`` (reduction)."""

    def prod(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.prod`` (reduction)."""

    def amax(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.amax`` (reduction)."""

    def amin(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.amin`` (reduction)."""

    def argmax(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.argmax`` (reduction)."""

    def argmin(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.argmin`` (reduction)."""

    def std(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.std`` (reduction)."""

    def var(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.var`` (reduction)."""

    def norm(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.norm`` (reduction)."""

    def all(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.all`` (reduction)."""

    def any(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.any`` (reduction)."""

    def cumsum(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.cumsum`` (reduction)."""

    def logsumexp(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.logsumexp`` (reduction)."""

    @overload
    def max(self) -> Pointer: ...
    @overload
    def max(self, dim: builtins.int, keepdim: builtins.bool = ...) -> tuple[Pointer, Pointer]: ...
    @overload
    def max(self, other: Any) -> Pointer: ...
    def max(self, *args: Any, **kwargs: Any) -> Pointer | tuple[Pointer, Pointer]:
        """Remote ``torch.Tensor.max`` (reduction)."""

    @overload
    def min(self) -> Pointer: ...
    @overload
    def min(self, dim: builtins.int, keepdim: builtins.bool = ...) -> tuple[Pointer, Pointer]: ...
    @overload
    def min(self, other: Any) -> Pointer: ...
    def min(self, *args: Any, **kwargs: Any) -> Pointer | tuple[Pointer, Pointer]:
        """Remote ``torch.Tensor.min`` (reduction)."""

    def topk(self, *args: Any, **kwargs: Any) -> tuple[Pointer, Pointer]:
        """Remote ``torch.Tensor.topk`` (reduction)."""

    def sort(self, *args: Any, **kwargs: Any) -> tuple[Pointer, Pointer]:
        """Remote ``torch.Tensor.sort`` (reduction)."""

    def aminmax(self, *args: Any, **kwargs: Any) -> tuple[Pointer, Pointer]:
        """Remote ``torch.Tensor.aminmax`` (reduction)."""

    def reshape(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.reshape`` (reshaping)."""

    def view(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.view`` (reshaping)."""

    def flatten(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.flatten`` (reshaping)."""

    def squeeze(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.squeeze`` (reshaping)."""

    def unsqueeze(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.unsqueeze`` (reshaping)."""

    def t(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.t`` (reshaping)."""

    def transpose(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.transpose`` (reshaping)."""

    def permute(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.permute`` (reshaping)."""

    def contiguous(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.contiguous`` (reshaping)."""

    def expand(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.expand`` (reshaping)."""

    def narrow(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.narrow`` (reshaping)."""

    def diagonal(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.diagonal`` (reshaping)."""

    def detach(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.detach`` (reshaping)."""

    def clone(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.clone`` (reshaping)."""

    def repeat(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.repeat`` (reshaping)."""

    def flip(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.flip`` (reshaping)."""

    def index_select(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.index_select`` (reshaping)."""

    def gather(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.gather`` (reshaping)."""

    def masked_fill(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.masked_fill`` (reshaping)."""

    def tril(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.tril`` (reshaping)."""

    def triu(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.triu`` (reshaping)."""

    def masked_select(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.masked_select`` (reshaping)."""

    def nonzero(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.nonzero`` (reshaping)."""

    def split(self, *args: Any, **kwargs: Any) -> tuple[Pointer, ...]:
        """Remote ``torch.Tensor.split`` (reshaping)."""

    def chunk(self, *args: Any, **kwargs: Any) -> tuple[Pointer, ...]:
        """Remote ``torch.Tensor.chunk`` (reshaping)."""

    def unbind(self, *args: Any, **kwargs: Any) -> tuple[Pointer, ...]:
        """Remote ``torch.Tensor.unbind`` (reshaping)."""

    def exp(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.exp`` (element-wise)."""

    def log(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.log`` (element-wise)."""

    def log1p(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.log1p`` (element-wise)."""

    def expm1(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.expm1`` (element-wise)."""

    def sqrt(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sqrt`` (element-wise)."""

    def rsqrt(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.rsqrt`` (element-wise)."""

    def square(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.square`` (element-wise)."""

    def sin(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sin`` (element-wise)."""

    def cos(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.cos`` (element-wise)."""

    def tanh(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.tanh`` (element-wise)."""

    def sigmoid(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sigmoid`` (element-wise)."""

    def relu(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.relu`` (element-wise)."""

    def clamp(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.clamp`` (element-wise)."""

    def floor(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.floor`` (element-wise)."""

    def ceil(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.ceil`` (element-wise)."""

    def round(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.round`` (element-wise)."""

    def sign(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sign`` (element-wise)."""

    def reciprocal(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.reciprocal`` (element-wise)."""

    def softmax(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.softmax`` (element-wise)."""

    def log_softmax(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.log_softmax`` (element-wise)."""

    def float(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.float`` (conversion)."""

    def double(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.double`` (conversion)."""

    def half(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.half`` (conversion)."""

    def bfloat16(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.bfloat16`` (conversion)."""

    def int(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.int`` (conversion)."""

    def long(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.long`` (conversion)."""

    def bool(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.bool`` (conversion)."""

    def type_as(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.type_as`` (conversion)."""

    def to(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.to`` (conversion)."""

    def add_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.add_`` (in place, returns this pointer)."""

    def __iadd__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.add_`` (in place, returns this pointer)."""

    def sub_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sub_`` (in place, returns this pointer)."""

    def __isub__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.sub_`` (in place, returns this pointer)."""

    def mul_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mul_`` (in place, returns this pointer)."""

    def __imul__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.mul_`` (in place, returns this pointer)."""

    def div_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.div_`` (in place, returns this pointer)."""

    def __itruediv__(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.div_`` (in place, returns this pointer)."""

    def zero_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.zero_`` (in place, returns this pointer)."""

    def addcmul_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.addcmul_`` (in place, returns this pointer)."""

    def addcdiv_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.addcdiv_`` (in place, returns this pointer)."""

    def copy_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.copy_`` (in place, returns this pointer)."""

    def fill_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.fill_`` (in place, returns this pointer)."""

    def clamp_(self, *args: Any, **kwargs: Any) -> Pointer:
        """Remote ``torch.Tensor.clamp_`` (in place, returns this pointer)."""
