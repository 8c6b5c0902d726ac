"""Conversion between torch tensors and the wire's raw buffers, without copies where possible.

Sending: a contiguous CPU tensor is exposed as a byte view of its own memory. Receiving: a
buffer is wrapped by `torch.frombuffer`; small or misaligned buffers are copied once, since a
zmq frame of a few bytes may sit at any address.
"""

from __future__ import annotations

import warnings

import torch

from fedptr.errors import ProtocolError
from fedptr.wire import DTYPE_ITEMSIZE, RawTensor

DTYPE_BY_NAME: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}
"""The torch dtype of every wire dtype name (`fedptr.wire.DTYPE_ITEMSIZE` is the allow-list)."""
NAME_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_BY_NAME.items()}

_ZERO_COPY_MIN_BYTES = 1 << 16
"""Buffers smaller than this are copied on receipt: the copy is cheaper than the risk of an
unaligned view, and it frees the frame at once."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of `dtype`; raises ProtocolError for a dtype that may not travel."""
    name = NAME_BY_DTYPE.get(dtype)
    if name is None:
        raise ProtocolError(f"dtype {dtype} cannot be sent")
    return name


def to_raw(t: torch.Tensor, copy: bool = False) -> RawTensor:
    """A wire view of `t` (detached; made contiguous only if it is not already), or with `copy`
    a copy of its bytes, made with one memcpy: torch's `clone` splits a copy over its intra-op
    threads, and with more threads than free cores (torch counts 8 on this 2-core machine) a
    1 MiB clone took 8 ms instead of 0.1."""
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
    return RawTensor(name, tuple(t.shape), memoryview(bytearray(data)) if copy else data)


def from_raw(raw: RawTensor) -> torch.Tensor:
    """A tensor over `raw`'s buffer (a copy for small or misaligned buffers)."""
    dtype = DTYPE_BY_NAME[raw.dtype]
    if raw.nbytes == 0:
        return torch.empty(raw.shape, dtype=dtype)
    data = raw.data
    if raw.nbytes < _ZERO_COPY_MIN_BYTES:
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(raw.shape)
    with warnings.catch_warnings():
        # zmq frames are read-only buffers; the tensor built on one is owned by us alone
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        t = torch.frombuffer(data, dtype=dtype)
    if t.data_ptr() % t.element_size():
        t = t.clone()
    return t.reshape(raw.shape)
