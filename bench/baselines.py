"""The baselines fedptr is measured against, each in its own process.

* ``python bench/baselines.py rpc-driver PORT THREADS SIZES``: torch.distributed.rpc's rank 0
  (the caller). It reads one JSON command a line on stdin, ``{"case", "arg", "n", "budget"}``,
  times that case and answers ``@@{"samples": [...]}``; ``{"case": "quit"}`` ends it. SIZES
  (MiB, comma-separated) are the tensors it stores on the worker for ``get``.
* ``python bench/baselines.py rpc-worker PORT THREADS``: the torch.distributed.rpc (TensorPipe)
  worker ``w1`` the driver calls.
* ``python bench/baselines.py bare-broker``: a bare pyzmq ROUTER relay (the transport floor),
  printing its endpoint.
* ``python bench/baselines.py bare-echo ENDPOINT``: a DEALER that echoes through it.

THREADS > 0 sets torch's intra-op threads in the torch.rpc processes (0: torch's default).

The torch.rpc cases are its pointer operations, each the counterpart of a fedptr one:

=========== ============================================== =====================================
case        torch.rpc                                      fedptr
=========== ============================================== =====================================
put         ``remote(w1, torch.clone, (t,))``, created     ``await worker.send(t)``
op          ``remote(w1, add, (rref, rref))``, created     ``await (x + x)``
send_op_get ``remote``, ``remote``, ``to_here``            send, op, get
dependent   N ``rpc_sync(w1, torch.add, (y, t))``          N dependent ops, then get
inflight    a window of K ``rpc_async(w1, add, ...)``      K ops in flight
send        ``rpc_sync(w1, store, (key, t))``              ``await worker.send(t)``
get         ``rpc_sync(w1, fetch, (key,))``                ``await pointer.get()``
=========== ============================================== =====================================

"Created" means the RRef's creation is confirmed by its owner (``rref._get_future().wait()``:
the future of the remote call that creates it), not that its value came back.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

MIB = 1 << 20
WORLD = 2
CALLEE = "w1"
READY = "ready"
REPLY = "@@"
_STORE: dict[str, torch.Tensor] = {}


# --- rpc targets (run on the worker) ---------------------------------------------------------
def store(key: str, t: torch.Tensor) -> None:
    """rpc target: keep `t` under `key` on the callee."""
    _STORE[key] = t


def fetch(key: str) -> torch.Tensor:
    """rpc target: return the tensor under `key`."""
    return _STORE[key]


def add(a: Any, b: Any) -> torch.Tensor:
    """rpc target: ``a + b`` on the RRefs' owner; the result stays there when called by `remote`."""
    return a.local_value() + b.local_value()  # type: ignore[no-any-return]


# --- timing, shared with run.py --------------------------------------------------------------
def bounded(n: int, budget: float) -> Iterator[int]:
    """Yield 0..n-1, stopping early once `budget` seconds have passed (after at least one)."""
    end = time.perf_counter() + budget
    for i in range(n):
        if i and time.perf_counter() > end:
            return
        yield i


def time_calls(fn: Callable[[int], object], arg: int, n: int, budget: float) -> list[float]:
    """Seconds per call of ``fn(arg)``, at most `n` calls and about `budget` seconds."""
    samples = []
    for _ in bounded(n, budget):
        t0 = time.perf_counter()
        fn(arg)
        samples.append(time.perf_counter() - t0)
    return samples


# --- torch.distributed.rpc -------------------------------------------------------------------
def init_rpc(rank: int, port: int, threads: int) -> None:
    import torch.distributed.rpc as rpc

    if threads > 0:
        torch.set_num_threads(threads)
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=WORLD, rpc_backend_options=opts)  # type: ignore[no-untyped-call]


def created(rref: Any) -> Any:
    """Wait until `rref`'s owner confirmed creating its value; return `rref`."""
    rref._get_future().wait()
    return rref


class TorchCases:
    """torch.rpc's side of each case; a method's int argument is the case's parameter."""

    def __init__(self, sizes: list[int]) -> None:
        import torch.distributed.rpc as rpc

        self.rpc = rpc
        self.small = torch.ones(4)
        self.x = created(rpc.remote(CALLEE, torch.clone, args=(self.small,)))
        self.big = {mib: torch.randn(mib * MIB // 4) for mib in sizes}
        for mib in sizes:
            self.send(mib)  # so that `get` finds it

    def calls(self) -> dict[str, Callable[[int], object]]:
        return {
            "put": self.put,
            "op": self.op,
            "send_op_get": self.send_op_get,
            "dependent": self.dependent,
            "inflight": self.inflight,
            "send": self.send,
            "get": self.get,
        }

    def put(self, _: int) -> None:
        created(self.rpc.remote(CALLEE, torch.clone, args=(self.small,)))

    def op(self, _: int) -> None:
        created(self.rpc.remote(CALLEE, add, args=(self.x, self.x)))

    def send_op_get(self, _: int) -> None:
        r = self.rpc.remote(CALLEE, torch.clone, args=(self.small,))
        self.rpc.remote(CALLEE, add, args=(r, r)).to_here()

    def dependent(self, n: int) -> None:
        y = self.small
        for _ in range(n):
            y = self.rpc.rpc_sync(CALLEE, torch.add, args=(y, self.small))

    def inflight(self, k: int) -> None:
        torch.futures.wait_all([self.rpc.rpc_async(CALLEE, add, args=(self.x, self.x)) for _ in range(k)])

    def send(self, mib: int) -> None:
        self.rpc.rpc_sync(CALLEE, store, args=(f"k{mib}", self.big[mib]))

    def get(self, mib: int) -> None:
        self.rpc.rpc_sync(CALLEE, fetch, args=(f"k{mib}",))


def rpc_worker(port: int, threads: int) -> None:
    import torch.distributed.rpc as rpc

    init_rpc(1, port, threads)
    rpc.shutdown()  # serves until the driver shuts down too


def rpc_driver(port: int, threads: int, sizes: list[int]) -> None:
    import torch.distributed.rpc as rpc

    init_rpc(0, port, threads)
    calls = TorchCases(sizes).calls()
    print(REPLY + READY, flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["case"] == "quit":
            break
        samples = time_calls(calls[command["case"]], command["arg"], command["n"], command["budget"])
        print(REPLY + json.dumps({"samples": samples}), flush=True)
    rpc.shutdown()


# --- the transport floor ---------------------------------------------------------------------
def bare_broker() -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    peers: dict[bytes, bytes] = {}
    while True:
        frames = sock.recv_multipart(copy=False)
        sender, dest = frames[0].bytes, frames[1].bytes
        if dest == b"register":
            peers[frames[2].bytes] = sender
            continue
        frames[0] = peers.get(dest, dest)  # type: ignore[call-overload]  # a name, or a raw identity
        frames[1] = sender  # type: ignore[call-overload]
        sock.send_multipart(frames, copy=False)


def bare_echo(endpoint: str) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"register", b"echo"])
    while True:
        frames = sock.recv_multipart(copy=False)
        sock.send_multipart(frames, copy=False)  # [sender, payload] goes back to the sender


if __name__ == "__main__":
    role, argv = sys.argv[1], sys.argv[2:]
    if role == "rpc-driver":
        rpc_driver(int(argv[0]), int(argv[1]), [int(s) for s in argv[2].split(",")])
    elif role == "rpc-worker":
        rpc_worker(int(argv[0]), int(argv[1]))
    elif role == "bare-broker":
        bare_broker()
    elif role == "bare-echo":
        bare_echo(argv[0])
    else:
        sys.exit(f"unknown role {role!r}")
