"""The baselines fedptr is measured against, each in its own process.

* ``python bench/baselines.py rpc-worker RANK WORLD PORT``: a torch.distributed.rpc (TensorPipe)
  worker; the bench process is rank 0 and calls the functions below on it.
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
    if role == "rpc-worker":
        rpc_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif role == "bare-broker":
        bare_broker()
    elif role == "bare-echo":
        bare_echo(sys.argv[2])
