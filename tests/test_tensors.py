"""fedptr.tensors: the short path for small tensors gives the wire the very bytes the general path
gives, for every dtype, shape, stride, offset and lazy negation or conjugate; and a buffer read
back through either path is the same tensor."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedptr import limits
from fedptr.tensors import DTYPE_BY_NAME, _to_raw, from_raw, to_raw
from fedptr.wire import RawTensor
from tests.conftest import examples


def _base(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype if dtype.is_complex else torch.float64, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    lo, hi = (0, 256) if dtype == torch.uint8 else (-100, 100)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A CPU tensor of any wire dtype, maybe a view: transposed, sliced with a step and an
    offset, expanded (stride 0), lazily negated or conjugated, or requiring grad."""
    dtype = DTYPE_BY_NAME[draw(st.sampled_from(sorted(DTYPE_BY_NAME)))]
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    t = _base(dtype, shape, draw(st.integers(0, 2**31)))
    view = draw(st.sampled_from(["plain", "transpose", "slice", "expand", "neg", "conj", "grad"]))
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, t.dim() - 1)
    elif view == "slice" and t.dim() >= 1:
        t = t[draw(st.integers(0, 2)) :: draw(st.integers(1, 3))]
    elif view == "expand":
        t = t.reshape(*t.shape, 1).expand(*t.shape, draw(st.integers(0, 3)))
    elif view == "neg" and dtype != torch.bool:
        t = torch._neg_view(t)
    elif view == "conj" and dtype.is_complex:
        t = t.conj()
    elif view == "grad" and (dtype.is_floating_point or dtype.is_complex):
        t = t.requires_grad_()
    return t


@settings(max_examples=examples(400), deadline=None)
@given(tensors())
def test_the_short_path_sends_the_general_paths_bytes(t: torch.Tensor) -> None:
    short, general = to_raw(t), _to_raw(t, copy=False)
    assert (short.dtype, short.shape) == (general.dtype, general.shape)
    assert short.data.nbytes == general.data.nbytes == t.nbytes
    assert bytes(short.data) == bytes(general.data)
    assert bytes(to_raw(t, copy=True).data) == bytes(general.data)


@settings(max_examples=examples(400), deadline=None)
@given(tensors())
def test_a_small_buffer_reads_back_as_torch_reads_it(t: torch.Tensor) -> None:
    raw = to_raw(t)
    got = from_raw(RawTensor(raw.dtype, raw.shape, memoryview(bytes(raw.data))))
    assert (got.dtype, got.shape, got.is_contiguous(), got.requires_grad) == (t.dtype, t.shape, True, False)
    if t.nbytes:
        expected = torch.frombuffer(bytearray(raw.data), dtype=t.dtype).reshape(raw.shape)
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    assert bytes(_to_raw(got, copy=False).data) == bytes(raw.data)
    # writable, and its own memory: the frame it came from is not changed
    got.add_(1) if got.dtype != torch.bool else got.logical_not_()
    assert bytes(raw.data) == bytes(_to_raw(t, copy=False).data)


def test_a_small_tensor_is_a_copy_and_a_big_one_a_view() -> None:
    """Small: the bytes are taken now (a later write to the tensor does not reach them). Big:
    they are the tensor's own memory, as before."""
    small = torch.zeros(4)
    raw = to_raw(small)
    small.add_(1)
    assert bytes(raw.data) == bytes(4 * 4)
    big = torch.zeros(limits.TENSOR_VIEW_MIN_BYTES // 4)
    raw = to_raw(big)
    big.add_(1)
    assert bytes(raw.data) == big.numpy().tobytes()
