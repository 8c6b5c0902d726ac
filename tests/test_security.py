"""CURVE with an allow-list (Ironhouse): wrong key, no key and a spoofed name are refused and logged."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
import zmq
import zmq.asyncio
from fedptr.broker.router import Broker, BrokerConfig

import fedptr
from fedptr import envelope, wire
from fedptr.security import CurveKeys, generate, needs_keys
from tests.conftest import eventually

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(["bob", "alice"], curve=True) as c:
        yield c


def dealer(address: str, keys: CurveKeys | None) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    sock.connect(address)
    return sock


async def try_register(sock: zmq.asyncio.Socket, name: bytes, role: bytes) -> envelope.Envelope | None:
    await sock.send_multipart(envelope.build(envelope.REGISTER, name, b"\1" * 8, role))
    if await sock.poll(1000):
        [answer] = envelope.parse(await sock.recv_multipart())
        return answer
    return None


@MODULE_LOOP
async def test_keyed_cluster_runs_the_walkthrough_ops(secure: fedptr.Cluster) -> None:
    bob, alice = secure.client.worker("bob"), secure.client.worker("alice")
    p = await (await bob.send(torch.tensor([1, 2, 3]))).send(alice)
    y = p + p
    inner = await y.get()
    assert isinstance(inner, fedptr.Pointer)
    assert torch.equal(await inner.get(), torch.tensor([2, 4, 6]))  # type: ignore[arg-type]


@MODULE_LOOP
async def test_no_key_is_refused_and_logged(secure: fedptr.Cluster) -> None:
    sock = dealer(secure.address, None)
    assert await try_register(sock, b"client-nokey", envelope.ROLE_CLIENT) is None
    sock.close()
    assert await eventually(lambda: _logged(secure, "handshake failed"))


@MODULE_LOOP
async def test_wrong_key_is_refused_and_logged(secure: fedptr.Cluster, tmp_path: Path) -> None:
    generate(tmp_path, "stranger")
    assert secure.keys_dir is not None
    keys = CurveKeys.load(tmp_path / "stranger.key_secret", secure.keys_dir / "broker.key")
    sock = dealer(secure.address, keys)
    assert await try_register(sock, b"client-stranger", envelope.ROLE_CLIENT) is None
    sock.close()
    assert await eventually(lambda: _logged(secure, "DENIED"))


@MODULE_LOOP
async def test_spoofed_name_is_refused_and_logged(secure: fedptr.Cluster) -> None:
    assert secure.keys_dir is not None
    keys = CurveKeys.load(secure.keys_dir / "client.key_secret", secure.keys_dir / "broker.key")
    sock = dealer(secure.address, keys)
    for name, role in (
        (b"bob", envelope.ROLE_WORKER),
        (b"carol", envelope.ROLE_WORKER),
        (b"alice", envelope.ROLE_CLIENT),
    ):
        reply = await try_register(sock, name, role)
        assert reply is not None and reply.command == envelope.BROKER_ERROR, name
        assert reply.body[0] == envelope.REASON_FORBIDDEN, name
    sock.close()
    assert await eventually(lambda: _logged(secure, "its key is not the one bound to that name"))
    assert await secure.client.workers() == ["alice", "bob"]


async def _logged(cluster: fedptr.Cluster, text: str) -> bool:
    await asyncio.sleep(0)
    return text in cluster.log("broker")


def test_public_bind_needs_keys() -> None:
    assert needs_keys("tcp://0.0.0.0:5555") and needs_keys("tcp://10.1.2.3:5555")
    assert not needs_keys("tcp://127.0.0.1:5555") and not needs_keys("ipc:///tmp/x") and not needs_keys("tcp://[::1]:1")
    proc = subprocess.run(
        [sys.executable, "-m", "fedptr.broker", "--bind", "tcp://0.0.0.0:*"], capture_output=True, timeout=30
    )
    assert proc.returncode == 2 and b"without keys" in proc.stderr


def test_keys_command_writes_a_pair(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "fedptr.cli", "keys", str(tmp_path), "carol"], check=True)
    assert (tmp_path / "carol.key").exists() and (tmp_path / "carol.key_secret").exists()
    assert (tmp_path / "carol.key_secret").stat().st_mode & 0o077 == 0


@MODULE_LOOP
async def test_a_client_cannot_touch_another_clients_objects(secure: fedptr.Cluster) -> None:
    assert secure.keys_dir is not None
    bob = secure.client.worker("bob")
    mine = await bob.send(torch.tensor([1.0, 2.0]))
    keys = CurveKeys.load(secure.keys_dir / "client.key_secret", secure.keys_dir / "broker.key")
    async with fedptr.connect(secure.address, curve=keys, timeout=5) as intruder:
        stolen = fedptr.Pointer(intruder, "bob", mine.id_at_location, deletes=False)
        for attempt in (stolen.get(), stolen + 1, stolen.move(intruder.worker("alice"))):
            with pytest.raises(fedptr.PermissionDenied, match="belongs to another peer"):
                await attempt
        intruder.link.notify("bob", wire.Delete([mine.id_at_location]))  # ignored, and logged
        await intruder.worker("bob").clear()  # clears only the intruder's own objects
    assert torch.equal(await (mine + 0).get(), torch.tensor([1.0, 2.0]))  # type: ignore[arg-type]
    assert "does not own" in secure.log("bob")  # the deletion
    assert secure.log("bob").count("refused") >= 4  # the get, the op, the move and the deletion


@pytest.mark.asyncio
async def test_in_process_broker_logs_a_refusal_while_no_message_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve_async` reads the monitor when its FD says so, not only in a turn that a message
    (or a heartbeat, an hour away here) started: a refused handshake is logged at once."""
    generate(tmp_path / "allow", "bob")
    _, secret = generate(tmp_path, "broker")
    config = BrokerConfig(
        bind="tcp://127.0.0.1:*", heartbeat_s=3600.0, curve_secret=str(secret), allow=str(tmp_path / "allow")
    )
    broker = Broker(config)
    task = asyncio.create_task(broker.serve_async())
    sock = dealer(broker.endpoint, None)
    try:
        await sock.send_multipart(envelope.build(envelope.HEARTBEAT, b"", envelope.NO_REPLY))

        async def refused() -> bool:
            return "refused a connection" in caplog.text

        assert await eventually(refused)
    finally:
        sock.close()
        broker.stop()
        await asyncio.wait_for(task, 5.0)
        broker.close()
