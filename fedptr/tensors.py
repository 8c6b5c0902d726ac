"""Conversion between torch tensors and the wire's raw buffers, without copies where possible.

Sending: a contiguous CPU tensor is exposed as a byte view of its own memory. Receiving: a
buffer is wrapped by `torch.frombuffer`; small or misaligned buffers are copied once, since a
zmq frame of a few bytes may sit at any address.

Small tensors (under `limits.TENSOR_VIEW_MIN_BYTES`) of a dtype numpy knows take a short path
both ways, through numpy: `ndarray.tobytes` writes any strided layout out in C order in one
call, and `np.frombuffer(...).reshape` shapes a buffer without torch's dispatcher (torch's
`reshape` alone costs ~1 µs). A 4-element get is otherwise ~4 µs of torch calls at each end
(detach, reshape, view, numpy, memoryview). bfloat16 and complex tensors (numpy has no
bfloat16; a complex tensor may carry a lazy conjugate) and big ones keep the general path;
both paths give the same bytes (tests/test_tensors.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fedptr import limits
from fedptr.errors import ProtocolError
from fedptr.wire import DTYPE_ITEMSIZE, RawTensor

DTYPE_BY_NAME: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}
"""The torch dtype of every wire dtype name (`fedptr.wire.DTYPE_ITEMSIZE` is the allow-list)."""
NAME_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_BY_NAME.items()}

_NUMPY_NAMES = ("float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
_SHORT_NAME_BY_DTYPE: dict[torch.dtype, str] = {DTYPE_BY_NAME[name]: name for name in _NUMPY_NAMES}
"""The dtypes of the short path out: numpy holds them bit for bit, and none can be conjugate."""
_SHORT_NUMPY_BY_NAME: dict[str, np.dtype] = {name: np.dtype(name) for name in _NUMPY_NAMES}
"""The numpy dtype of each wire name of the short path in."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of `dtype`; raises ProtocolError for a dtype that may not travel."""
    name = NAME_BY_DTYPE.get(dtype)
    if name is None:
        raise ProtocolError(f"dtype {dtype} cannot be sent")
    return name


def to_raw(t: torch.Tensor, copy: bool = False) -> RawTensor:
    """A wire view of `t` (detached; made contiguous only if it is not already), or with `copy`
    an immutable copy of its bytes (the link keeps or hands zmq it as is: `fedptr.zio.owned`),
    made with one memcpy: torch's `clone` splits a copy over its intra-op
    threads, and with more threads than free cores (torch counts 8 on this 2-core machine) a
    1 MiB clone took 8 ms instead of 0.1. A small tensor is always copied (the short path)."""
    name = _SHORT_NAME_BY_DTYPE.get(t.dtype)
    if (
        name is not None
        and t.nbytes < limits.TENSOR_VIEW_MIN_BYTES
        and t.is_cpu
        and t.layout is torch.strided
        and not t.is_nested
        and not t.is_neg()  # numpy() refuses a lazy negation; the general path resolves it
    ):
        if t.requires_grad:
            t = t.detach()
        return RawTensor(name, tuple(t.shape), memoryview(t.numpy().tobytes()))
    return _to_raw(t, copy)


def _to_raw(t: torch.Tensor, copy: bool) -> RawTensor:
    if t.device.type != "cpu":
        raise ProtocolError(f"only CPU tensors can be sent, not {t.device}")
    if t.is_sparse or t.layout != torch.strided:
        raise ProtocolError("only dense (strided) tensors can be sent")
    name = dtype_name(t.dtype)
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # "contiguous" with size-1 (or empty) dimensions of any stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    flat = flat.view(torch.uint8)
    # numpy keeps `flat` (and so the tensor's storage) alive for as long as the view lives.
    data = memoryview(flat.numpy())  # type: ignore[arg-type]
    return RawTensor(name, tuple(t.shape), memoryview(data.tobytes()) if copy else data)


def from_raw(raw: RawTensor) -> torch.Tensor:
    """A tensor over `raw`'s buffer (a copy for small or misaligned buffers)."""
    dtype = DTYPE_BY_NAME[raw.dtype]
    if raw.nbytes == 0:
        return torch.empty(raw.shape, dtype=dtype)
    data = raw.data
    if raw.nbytes < limits.TENSOR_VIEW_MIN_BYTES:
        np_dtype = _SHORT_NUMPY_BY_NAME.get(raw.dtype)
        if np_dtype is not None:
            return torch.from_numpy(np.frombuffer(bytearray(data), dtype=np_dtype).reshape(raw.shape))
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(raw.shape)
    with warnings.catch_warnings():
        # zmq frames are read-only buffers; the tensor built on one is owned by us alone
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        t = torch.frombuffer(data, dtype=dtype)
    if t.data_ptr() % t.element_size():
        t = t.clone()
    return t.reshape(raw.shape)
