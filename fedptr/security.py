"""CURVE keys for fedptr peers (the Ironhouse pattern): generation, loading, socket set-up.

Every peer has a key pair; the broker accepts only connections whose public key is in its
allow-list directory, and binds worker names to keys: ``bob.key`` in that directory is the only
key that may register the worker ``bob``. Secret key files never belong in a repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    """A peer's CURVE key pair (z85) and the broker's public key it expects."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_file: str | os.PathLike[str], broker_key_file: str | os.PathLike[str]) -> CurveKeys:
        """Keys from a ``NAME.key_secret`` file and the broker's public ``.key`` file."""
        public, secret = zmq.auth.load_certificate(secret_file)
        server, _ = zmq.auth.load_certificate(broker_key_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key")
        return cls(public, secret, server)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CURVE client of the broker."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def generate(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600) in `directory`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def allowed_keys(directory: str | os.PathLike[str]) -> dict[bytes, bytes]:
    """Name -> z85 public key of every ``NAME.key`` in an allow-list directory."""
    keys: dict[bytes, bytes] = {}
    for path in Path(directory).glob("*.key"):
        public, _ = zmq.auth.load_certificate(path)
        keys[path.stem.encode()] = public
    return keys


def needs_keys(bind: str) -> bool:
    """Whether binding `bind` without CURVE would expose the broker beyond this machine."""
    if not bind.startswith("tcp://"):
        return False
    host = bind[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127.")
