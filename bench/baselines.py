"""The baselines fedptr is measured against, each in its own process.

* ``python bench/baselines.py rpc-driver WORLD PORT``: torch.distributed.rpc's rank 0, in its
  own process (so its agent's threads do not share the GIL with fedptr's client); it reads one
  JSON command a line on stdin, runs that timed case and answers ``@@{"samples": [...]}``.
* ``python bench/baselines.py rpc-worker RANK WORLD PORT``: a torch.distributed.rpc (TensorPipe)
  worker the driver calls the functions below on.
* ``python bench/baselines.py bare-broker``: a bare pyzmq ROUTER relay (the transport floor),
  printing its endpoint.
* ``python bench/baselines.py bare-echo ENDPOINT``: a DEALER that echoes through it.
"""

from __future__ import annotations

import sys

import torch

_STORE: dict[str, torch.Tensor] = {}


def store(key: str, t: torch.Tensor) -> None:
    """rpc target: keep `t` under `key` on the callee."""
    _STORE[key] = t


def fetch(key: str) -> torch.Tensor:
    """rpc target: return the tensor under `key`."""
    return _STORE[key]


def identity(t: torch.Tensor) -> torch.Tensor:
    """rpc target: the RRef `put` (the tensor stays on the owner)."""
    return t


def add_rref(rref: object, y: float) -> torch.Tensor:
    """rpc target: an op on an RRef's value, on its owner."""
    return rref.local_value() + y  # type: ignore[attr-defined,no-any-return]


def rpc_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16)
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
    rpc.shutdown()


def rpc_driver(world: int, port: int) -> None:
    import json
    import time

    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=16)
    rpc.init_rpc("w0", rank=0, world_size=world, rpc_backend_options=opts)
    x = torch.ones(4)
    rref = rpc.remote("w1", identity, args=(x,))
    rref.to_here()
    big: dict[int, torch.Tensor] = {}

    def op(_: int) -> None:
        rpc.rpc_sync("w1", add_rref, args=(rref, 1.0))

    def send_op_get(_: int) -> None:
        r = rpc.remote("w1", identity, args=(x,))
        rpc.remote("w1", add_rref, args=(r, 1.0)).to_here()

    def dependent(n: int) -> None:
        r = rref
        for _ in range(n):
            r = rpc.remote("w1", add_rref, args=(r, 1.0))
            r.to_here()  # one awaited call at a time

    def in_flight(k: int) -> None:
        torch.futures.wait_all([rpc.rpc_async("w1", add_rref, args=(rref, 1.0)) for _ in range(k)])

    def send(mib: int) -> None:
        if mib not in big:
            big[mib] = torch.randn(mib * (1 << 20) // 4)
        rpc.rpc_sync("w1", store, args=(f"k{mib}", big[mib]))

    def get(mib: int) -> None:
        rpc.rpc_sync("w1", fetch, args=(f"k{mib}",))

    cases = {
        "op": op,
        "send-op-get": send_op_get,
        "dependent": dependent,
        "inflight": in_flight,
        "send": send,
        "get": get,
    }
    print("@@ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["case"] == "quit":
            break
        fn, arg = cases[command["case"]], command["arg"]
        samples: list[float] = []
        end = time.perf_counter() + command["budget"]
        for _ in range(command["n"]):
            t0 = time.perf_counter()
            fn(arg)
            samples.append(time.perf_counter() - t0)
            if time.perf_counter() > end:
                break
        print("@@" + json.dumps({"samples": samples}), flush=True)
    rpc.shutdown()


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
    role = sys.argv[1]
    if role == "rpc-driver":
        rpc_driver(int(sys.argv[2]), int(sys.argv[3]))
    elif role == "rpc-worker":
        rpc_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif role == "bare-broker":
        bare_broker()
    elif role == "bare-echo":
        bare_echo(sys.argv[2])
