"""The allow-list of remote operations, as sets derived from the op registry (`fedptr.opinfo`),
and the tags of values msgpack cannot carry.

Each operation is declared once, in `fedptr.opinfo.REGISTRY`; the sets here are views of it for
the code that asks one question (is it allowed? does it write?). Nothing outside the registry is
ever looked up by name.

Values that msgpack cannot carry travel as tagged values the node decodes (`DTYPE_PREFIX`,
`DEVICE_PREFIX`; in an index, `SLICE_KEY` and `ELLIPSIS_KEY`).
"""

from __future__ import annotations

from fedptr.opinfo import REGISTRY, Call, Privacy

ALLOWED: frozenset[str] = frozenset(REGISTRY)
"""Every operation name a node accepts."""
MUTATING: frozenset[str] = frozenset(n for n, i in REGISTRY.items() if i.mutating)
"""Operations that change their first argument; the client treats them as effects on it."""
ALIASING: frozenset[str] = frozenset(n for n, i in REGISTRY.items() if i.aliasing)
"""Operations whose result is (part of) their first operand by design: they share its taint."""
STRUCTURAL: frozenset[str] = frozenset(n for n, i in REGISTRY.items() if i.privacy is Privacy.STRUCTURAL)
"""Operations that read no value into a size: no meta run on private operands."""
AGGREGATES: frozenset[str] = frozenset(n for n, i in REGISTRY.items() if i.privacy is Privacy.RELEASE)
"""DP releases: an aggregator's only, never in a plan."""
TENSOR_METHODS: frozenset[str] = frozenset(n for n, i in REGISTRY.items() if i.call is Call.METHOD and not i.mutating)
"""Out-of-place operations that are methods of ``torch.Tensor`` of the same name."""
WRITING_KEYWORDS: frozenset[str] = frozenset({"out", "inplace", "max_norm"})
"""Parameters that make a call write into an argument when given (anything but None or False):
torch's ``out=`` (F.normalize's is its fifth positional one), ``inplace=`` of the functional ops,
and F.embedding's ``max_norm``, which renormalizes, in place, the rows of its weight the indices
pick. Refused by keyword and by position (nodes/policy.py, nodes/kernels.py, fedptr/graphs.py)."""

DTYPE_PREFIX = "torch.dtype:"
"""A ``torch.dtype`` argument travels as this prefix and its wire name, e.g. ``"torch.dtype:float64"``."""
DEVICE_PREFIX = "torch.device:"
"""A ``torch.device`` argument travels as this prefix and the device type; only ``cpu`` is accepted."""
SLICE_KEY = "__slice__"
"""In an index: ``{SLICE_KEY: [start, stop, step]}`` is a slice."""
ELLIPSIS_KEY = "__ellipsis__"
"""In an index: ``{ELLIPSIS_KEY: True}`` is ``...``."""
