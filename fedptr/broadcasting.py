"""`broadcast`: one tensor or model stored on many workers for one upload (the broker fans it out).

(Not ``fedptr/broadcast.py``: importing a submodule binds its name on the package, which would
hide the function ``fedptr.broadcast`` behind the module of the same name.)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedptr import limits, meta, modules, wire
from fedptr.awaiting import not_awaited
from fedptr.client import Client, Worker
from fedptr.errors import (
    BroadcastError,
    DeadlineExceeded,
    FedptrError,
    InvalidArgumentError,
    LostWorkerError,
    UnsupportedTypeError,
    UsageError,
)
from fedptr.pointer import ModulePointer, Pointer
from fedptr.tensors import to_raw


async def broadcast(x: torch.Tensor | nn.Module, workers: Sequence[Worker]) -> list[Pointer]:
    """Store `x` on each of `workers` and return the pointer to each copy, in the same order.

    Like `Worker.send` of a tensor (``requires_grad`` included) or of a model built from the
    allow-list of `fedptr.modules` (it comes back as a `ModulePointer`), but the client uploads
    `x` once: the broker relays the same bytes to every worker, in fan-outs of up to
    `limits.FANOUT_MAX_WIDTH` workers each. Every copy has the same object id in its worker's
    store. Each destination has the client's deadline and succeeds or fails on its own: one
    that fails does not stop the others from storing their copy.

    Raises BroadcastError when some destinations failed (the others stored their copy): its
    `errors` maps each failed worker's name to that destination's own typed error, named for
    who caused it as everywhere in fedptr (UnknownWorkerError: the broker knows no such worker;
    LostWorkerError or DeadlineExceeded: that worker, or the way to it; that worker's refusal,
    such as StoreFullError), and its `pointers` holds the pointers to the copies stored, in the
    order of `workers`, None where a destination failed. A destination that failed by
    LostWorkerError or DeadlineExceeded may still store its copy late (the request was not
    aborted there): this deletes it, once it lands. The caller's mistakes raise at once:
    InvalidArgumentError for no workers, a worker twice, a name no worker can have or workers
    of different clients; UnsupportedTypeError (a TypeError) for anything but a tensor or a
    model, and TypeError for a model outside the allow-list. UsageError when a tensor over
    `limits.SEND_COPY_MAX_BYTES` was changed in place before every destination answered: it is
    sent from its memory, as `Worker.send` sends it (the copies stored are deleted). This process raises
    TooManyInFlightError when the requests do not fit under the client's `max_in_flight`
    (await some results first), and ClientClosedError when the client is closed (closing while
    it waits fails each destination still unanswered with ClientClosedError, in a BroadcastError).
    """
    if not workers:
        raise InvalidArgumentError("broadcast needs at least one worker")
    for w in workers:
        if not isinstance(w, Worker):  # a bare name has no client to send through
            raise UnsupportedTypeError(f"broadcast takes Workers (client.worker('bob')), not {type(w).__name__} {w!r}")
    client = workers[0].client
    if any(w.client is not client for w in workers):
        raise InvalidArgumentError("the workers belong to different clients")
    names = [w.name for w in workers]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"a worker is named twice in {names}")
    obj_id = client.new_id()
    msg, pointer, unchanged = _request(client, x, obj_id)
    client._flush_deletes()  # as `Client.call` does: room is made on the workers before the copies land
    futures: list[asyncio.Future[wire.Message]] = []
    try:
        for i in range(0, len(names), limits.FANOUT_MAX_WIDTH):
            group = names[i : i + limits.FANOUT_MAX_WIDTH]
            futures += client.link.request_many_nowait(group, msg, client.timeout)
        # each future settles by the client's deadline at the latest: the session's timer fails it
        await asyncio.wait(futures)
    except BaseException:
        for name, fut in zip(names, futures, strict=False):
            fut.add_done_callback(functools.partial(_abandoned, client, name, obj_id))
        raise
    if not unchanged():
        for name, fut in zip(names, futures, strict=True):
            _abandoned(client, name, obj_id, fut)
        raise UsageError("the tensor was changed in place while it was being broadcast: broadcast it again")
    pointers: list[Pointer | None] = []
    errors: dict[str, FedptrError] = {}
    for name, fut in zip(names, futures, strict=True):
        error = fut.exception()
        if error is None:
            pointers.append(pointer(name))
            continue
        if not isinstance(error, FedptrError):
            raise error  # a bug, not a destination's failure
        if isinstance(error, (LostWorkerError, DeadlineExceeded)):
            # in doubt, not failed: the copy may still be stored there after this answer, and no
            # pointer will ever hold it; its deletion is queued behind it (and sent again once
            # that worker answers: `Client._heard`), so it goes whether or not it lands
            client.release(name, obj_id)
        errors[name] = error
        pointers.append(None)
    if errors:
        raise BroadcastError(errors, pointers)
    return [p for p in pointers if p is not None]


def _request(
    client: Client, x: torch.Tensor | nn.Module, obj_id: int
) -> tuple[wire.Message, Callable[[str], Pointer], Callable[[], bool]]:
    """The request that stores `x` as `obj_id`, how to make the pointer to a stored copy, and
    whether what it carries is still `x` as the call took it. The session keeps each
    destination's request to send it again on its own when the broker refuses it undelivered (it
    forgot the client), and a view would carry then what a write made of `x` since: `Worker.send`'s
    rule holds here. A model and a tensor up to `limits.SEND_COPY_MAX_BYTES` are copied now; a
    bigger tensor is sent from its memory, checked unchanged (its version) once every destination
    answered: a copy of 64 MiB cost a quarter more CPU per broadcast (docs/REDTEAM.md, nemesis7)."""
    if isinstance(x, torch.Tensor):
        took = meta.of_tensor(x)  # at the call, as the copy: a reshape in place meanwhile is not what was sent

        def tensor(name: str) -> Pointer:
            return Pointer(client, name, obj_id, meta=meta.of_tensor(took))  # each its own: a pointer's may change

        small, version = x.nbytes <= limits.SEND_COPY_MAX_BYTES, x._version
        put = wire.Put(obj_id, to_raw(x, copy=small), x.requires_grad)
        return put, tensor, lambda: small or x._version == version
    if isinstance(x, nn.Module):
        spec, params = modules.to_wire(x, copy=True)

        def model(name: str) -> Pointer:
            remote = ModulePointer(client, name, obj_id, spec)
            return remote if x.training else remote.eval()

        return wire.PutModule(obj_id, spec, params), model, lambda: True
    expected = "a tensor or an nn.Module"
    raise not_awaited(x, expected) or UnsupportedTypeError(f"can broadcast {expected}, not {type(x).__name__}")


def _abandoned(client: Client, name: str, obj_id: int, fut: asyncio.Future[wire.Message]) -> None:
    """A copy no pointer will hold (the broadcast was cancelled or failed midway): delete it once stored."""
    if not fut.cancelled() and fut.exception() is None:
        client.release(name, obj_id)
