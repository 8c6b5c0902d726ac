"""The declarative cluster file that ``fedptr up`` reads (TOML): a broker and named nodes.

A complete example, every key shown::

    [cluster]
    name = "part4"                   # default: the file's stem
    start_timeout = 60               # seconds for every process to start and register
    demo = true                      # `fedptr down --purge` may clear the nodes' stores (budgets)

    [broker]
    bind = "tcp://127.0.0.1:5555"    # tcp://HOST:* picks a free port
    heartbeat_ms = 1000              # applies to the broker and every node
    liveness = 3
    keys_dir = "keys"                # CURVE on: keys_dir/broker.key_secret, allow-list keys_dir,
                                     # each node's keys_dir/NAME.key_secret, up's keys_dir/client.key_secret
    # curve_secret = "keys/broker.key_secret"   (instead of keys_dir, with allow)
    # allow = "keys/allow"
    # client_secret = "keys/operator.key_secret"
    insecure = false
    metrics_port = 9100              # Prometheus metrics on 127.0.0.1:9100 (0: a free port; unset: off)
    log_format = "json"              # "text" (default) or "json", for the broker and every node
    args = []                        # any further fedptr-broker flags

    [nodes.bob]
    data = { digits = "data/bob-digits.npz" }   # private data, TAG = PATH.npz
    trust = ["secure_worker"]
    epsilon = 8.0                    # privacy budget (needs store); release = "exact" opts out of DP
    store = "store/bob"
    max_store_bytes = 0
    metrics_port = 9101              # this node's metrics (unset: off)
    args = []                        # any further fedptr-node flags

    [nodes.secure_worker]
    aggregator = true
    owners = ["bob", "alice"]        # the roster whose DP contributions it releases
    min_owners = 2

Relative paths are relative to the file's directory. Every mistake raises `ClusterFileError`
naming the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedptr import limits, logs
from fedptr.errors import FedptrError

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ClusterFileError(FedptrError, ValueError):
    """Raised when a cluster file cannot be read or holds a wrong value; `path` is the file and
    `key` the dotted key at fault (``"nodes.bob.trust"``), empty when the whole file is."""

    def __init__(self, path: Path, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class BrokerSpec:
    """The broker's settings, paths resolved."""

    bind: str = "tcp://127.0.0.1:5555"
    heartbeat_ms: int = int(limits.HEARTBEAT_INTERVAL_S * 1000)
    liveness: int = limits.HEARTBEAT_LIVENESS
    curve_secret: Path | None = None
    allow: Path | None = None
    client_secret: Path | None = None
    broker_key: Path | None = None
    insecure: bool = False
    metrics_port: int | None = None
    log_format: str = "text"
    """``text`` or ``json``, for the broker and every node."""
    args: tuple[str, ...] = ()

    def common(self) -> list[str]:
        """The flags the broker shares with every node: heartbeat and log format."""
        out = ["--heartbeat-ms", str(self.heartbeat_ms), "--liveness", str(self.liveness)]
        return out if self.log_format == "text" else [*out, "--log-format", self.log_format]

    def argv(self) -> list[str]:
        """The broker's command-line flags (after ``--bind``)."""
        out = self.common()
        if self.metrics_port is not None:
            out += ["--metrics-port", str(self.metrics_port)]
        if self.curve_secret is not None and self.allow is not None:
            out += ["--curve-secret", str(self.curve_secret), "--allow", str(self.allow)]
        if self.insecure:
            out.append("--insecure")
        return [*out, *self.args]


@dataclass(frozen=True)
class NodeSpec:
    """One worker node's settings, paths resolved."""

    name: str
    data: Mapping[str, Path] = field(default_factory=dict)
    trust: tuple[str, ...] = ()
    aggregator: bool = False
    owners: tuple[str, ...] = ()
    """An aggregator's roster: the data owners whose contributions it accepts."""
    min_owners: int | None = None
    release: str | None = None
    """``"dp"`` (the default) or ``"exact"``."""
    epsilon: float | None = None
    """A data owner's privacy budget (needs `store`)."""
    delta: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clip: float | None = None
    store: Path | None = None
    max_store_bytes: int | None = None
    pool_size: int | None = None
    max_forwards: int | None = None
    curve_secret: Path | None = None
    broker_key: Path | None = None
    metrics_port: int | None = None
    args: tuple[str, ...] = ()

    @property
    def role(self) -> str:
        """``"aggregator"``, ``"data owner"`` (it holds private data) or ``"worker"``."""
        if self.aggregator:
            return "aggregator"
        return "data owner" if self.data else "worker"

    def argv(self, broker: BrokerSpec) -> list[str]:
        """The node's command-line flags (after ``--name`` and ``--broker``)."""
        out = broker.common()
        if self.curve_secret is not None and self.broker_key is not None:
            out += ["--curve-secret", str(self.curve_secret), "--broker-key", str(self.broker_key)]
        out += [f"--data={tag}={path}" for tag, path in self.data.items()]
        for worker in self.trust:
            out += ["--trust", worker]
        if self.aggregator:
            out.append("--aggregator")
        for owner in self.owners:
            out += ["--owners", owner]
        optional = {
            "--min-owners": self.min_owners,
            "--release": self.release,
            "--epsilon": self.epsilon,
            "--delta": self.delta,
            "--dp-noise-multiplier": self.dp_noise_multiplier,
            "--dp-clip": self.dp_clip,
            "--store": self.store,
            "--max-store-bytes": self.max_store_bytes,
            "--pool-size": self.pool_size,
            "--max-forwards": self.max_forwards,
            "--metrics-port": self.metrics_port,
        }
        for flag, value in optional.items():
            if value is not None:
                out += [flag, str(value)]
        return [*out, *self.args]


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed, validated cluster file."""

    path: Path
    name: str
    broker: BrokerSpec
    nodes: Mapping[str, NodeSpec]
    start_timeout: float = limits.CLUSTER_START_TIMEOUT_S
    demo: bool = False
    """A demonstration cluster: ``fedptr down --purge`` may delete its nodes' stores, privacy
    budgets and audit logs included. A real deployment leaves it false and never resets a budget."""

    def check_files(self) -> None:
        """Raise `ClusterFileError` for the first key file or data file that does not exist."""
        needed: list[tuple[str, Path | None]] = [
            ("broker.curve_secret", self.broker.curve_secret),
            ("broker.allow", self.broker.allow),
            ("broker.client_secret", self.broker.client_secret),
            ("broker.broker_key", self.broker.broker_key),
        ]
        for node in self.nodes.values():
            needed += [(f"nodes.{node.name}.data.{tag}", p) for tag, p in node.data.items()]
            needed += [
                (f"nodes.{node.name}.curve_secret", node.curve_secret),
                (f"nodes.{node.name}.broker_key", node.broker_key),
            ]
        for key, path in needed:
            if path is not None and not path.exists():
                raise ClusterFileError(self.path, key, f"no such file or directory: {path}; {self._maker(key, path)}")

    def _maker(self, key: str, path: Path) -> str:
        """What writes the missing file `path` of `key`: a newcomer's next step."""
        if ".data." in key:
            script = self.path.parent / "prepare_digits.py"
            if script.exists():  # examples/cluster.toml: its data is made, not shipped
                return (
                    f"`python {script}` writes it (it needs scikit-learn: "
                    f"pip install -c constraints.txt -e '.[examples]')"
                )
            return "write the worker's private arrays with numpy.savez(path, x=..., y=...) (each becomes a tensor)"
        everyone = " ".join(["broker", "client", *self.nodes])
        if path == self.broker.allow:
            return f"`fedptr keys {path} {everyone}` writes every pair it needs"
        if path.parent == self.broker.allow:  # keys_dir: the broker's allow-list holds everyone's
            return f"`fedptr keys {path.parent} {everyone}` writes every pair keys_dir needs"
        return f"`fedptr keys {path.parent} {path.name.split('.')[0]}` writes the pair"


_CLUSTER_KEYS = {"name", "start_timeout", "demo"}
_BROKER_KEYS = {
    "bind",
    "heartbeat_ms",
    "liveness",
    "keys_dir",
    "curve_secret",
    "allow",
    "client_secret",
    "insecure",
    "metrics_port",
    "log_format",
    "args",
}
_NODE_KEYS = {
    "data",
    "trust",
    "aggregator",
    "owners",
    "release",
    "epsilon",
    "delta",
    "min_owners",
    "dp_noise_multiplier",
    "dp_clip",
    "store",
    "max_store_bytes",
    "pool_size",
    "max_forwards",
    "curve_secret",
    "broker_key",
    "metrics_port",
    "args",
}


class _Reader:
    """Typed access to one table of the file, naming the dotted key in every error."""

    def __init__(self, path: Path, prefix: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        self.path, self.prefix, self.table = path, prefix, table
        for key in table:
            if key not in allowed:
                raise self.error(key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def error(self, key: str, problem: str) -> ClusterFileError:
        return ClusterFileError(self.path, f"{self.prefix}.{key}" if self.prefix else key, problem)

    def _get(self, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.table.get(key)
        # bool is an int subclass: never accept true where a number is meant
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise self.error(key, f"must be {what}, not {type(value).__name__} {value!r}")
        return value

    def string(self, key: str) -> str | None:
        value: str | None = self._get(key, str, "a string")
        return value

    def boolean(self, key: str) -> bool:
        return bool(self._get(key, bool, "true or false"))

    def integer(self, key: str, minimum: int) -> int | None:
        value: int | None = self._get(key, int, "an integer")
        if value is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def number(self, key: str, minimum: float) -> float | None:
        value = self._get(key, (int, float), "a number")
        if value is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return None if value is None else float(value)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.string(key)
        if value is not None and value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)}, not {value!r}")
        return value

    def path_(self, key: str) -> Path | None:
        value = self.string(key)
        return None if value is None else (self.path.parent / value).resolve()

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, list, "a list of strings") or []
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"must be a list of strings; {item!r} is not a string")
        return tuple(value)

    def name_list(self, key: str) -> tuple[str, ...]:
        names = self.strings(key)
        for name in names:
            _check_name(self, key, name)
        return names


def _check_name(reader: _Reader, key: str, name: str) -> None:
    if not _NAME.fullmatch(name) or len(name.encode()) > limits.MAX_NAME_BYTES:
        raise reader.error(
            key, f"{name!r} is not a worker name (letters, digits, - _ . ; at most {limits.MAX_NAME_BYTES} bytes)"
        )


def _table(path: Path, doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ClusterFileError(path, key, f"must be a table ([{key}]), not {type(value).__name__}")
    return value


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file; paths in it become absolute, relative to its directory.

    Raises `ClusterFileError` (a ValueError) naming the file and the key for a missing file,
    invalid TOML, an unknown key, a value of the wrong type or range, or no nodes. Whether the
    files it names exist is checked by `ClusterSpec.check_files`."""
    file = Path(path).resolve()
    try:
        doc = tomllib.loads(file.read_text())
    except FileNotFoundError as e:
        raise ClusterFileError(
            file,
            "",
            "no such file: a cluster file is TOML with a [broker] table and a [nodes.NAME] table per "
            "worker (docs/operations.md, Cluster files); examples/cluster.toml is one to start from",
        ) from e
    except OSError as e:
        raise ClusterFileError(file, "", f"cannot read: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ClusterFileError(file, "", f"not valid TOML: {e}") from e
    for key in doc:
        if key not in ("cluster", "broker", "nodes"):
            raise ClusterFileError(file, key, "unknown table (known: broker, cluster, nodes)")

    top = _Reader(file, "cluster", _table(file, doc, "cluster"), _CLUSTER_KEYS)
    name = top.string("name") or file.stem
    if not _NAME.fullmatch(name):
        raise top.error("name", f"{name!r} must be letters, digits, - _ . (it names the state file)")
    start_timeout = top.number("start_timeout", 1.0) or limits.CLUSTER_START_TIMEOUT_S
    demo = top.boolean("demo")

    b = _Reader(file, "broker", _table(file, doc, "broker"), _BROKER_KEYS)
    keys_dir = b.path_("keys_dir")
    curve_secret, allow, client_secret = b.path_("curve_secret"), b.path_("allow"), b.path_("client_secret")
    if keys_dir is not None and (curve_secret is not None or allow is not None):
        raise b.error("keys_dir", "give keys_dir, or curve_secret with allow, not both")
    if (curve_secret is None) != (allow is None):
        raise b.error("curve_secret" if curve_secret is None else "allow", "curve_secret and allow go together")
    broker_key: Path | None = None
    if keys_dir is not None:
        curve_secret, allow = keys_dir / "broker.key_secret", keys_dir
        broker_key = keys_dir / "broker.key"
        client_secret = client_secret or keys_dir / "client.key_secret"
    elif curve_secret is not None:
        broker_key = curve_secret.with_name(curve_secret.name.removesuffix("_secret"))
        if client_secret is None:
            raise b.error("client_secret", "with curve_secret, name the key file `fedptr up` connects with")
    log_format = b.string("log_format") or "text"
    if log_format not in logs.FORMATS:
        raise b.error("log_format", f"must be one of {', '.join(logs.FORMATS)}, not {log_format!r}")
    bind = b.string("bind") or BrokerSpec.bind
    if not bind.startswith(("tcp://", "ipc://", "inproc://")):
        raise b.error("bind", f"must be an endpoint like tcp://127.0.0.1:5555, not {bind!r}")
    broker = BrokerSpec(
        bind=bind,
        heartbeat_ms=b.integer("heartbeat_ms", 1) or BrokerSpec.heartbeat_ms,
        liveness=b.integer("liveness", 1) or BrokerSpec.liveness,
        curve_secret=curve_secret,
        allow=allow,
        client_secret=client_secret,
        broker_key=broker_key,
        insecure=b.boolean("insecure"),
        metrics_port=b.integer("metrics_port", 0),
        log_format=log_format,
        args=b.strings("args"),
    )

    nodes_table = _table(file, doc, "nodes")
    if not nodes_table:
        raise ClusterFileError(file, "nodes", "no nodes: add at least one [nodes.NAME] table")
    nodes: dict[str, NodeSpec] = {}
    for node_name, table in nodes_table.items():
        if not isinstance(table, dict):
            raise ClusterFileError(file, f"nodes.{node_name}", "must be a table ([nodes.NAME])")
        n = _Reader(file, f"nodes.{node_name}", table, _NODE_KEYS)
        if not _NAME.fullmatch(node_name) or len(node_name.encode()) > limits.MAX_NAME_BYTES:
            raise ClusterFileError(file, f"nodes.{node_name}", "not a worker name (letters, digits, - _ .)")
        data_table = n._get("data", dict, "a table of TAG = PATH.npz") or {}
        data: dict[str, Path] = {}
        for tag, data_path in data_table.items():
            if not isinstance(data_path, str) or not data_path:
                raise n.error(f"data.{tag}", "must be a path to an .npz file")
            if "=" in tag or not tag:
                raise n.error(f"data.{tag}", "a tag must be non-empty and hold no '='")
            data[tag] = (file.parent / data_path).resolve()
        node_secret, node_broker_key = n.path_("curve_secret"), n.path_("broker_key")
        if keys_dir is not None:
            node_secret = node_secret or keys_dir / f"{node_name}.key_secret"
            node_broker_key = node_broker_key or broker_key
        elif broker_key is not None:
            node_broker_key = node_broker_key or broker_key
            if node_secret is None:
                raise n.error("curve_secret", "the broker uses CURVE: name this node's .key_secret file")
        nodes[node_name] = NodeSpec(
            name=node_name,
            data=data,
            trust=n.name_list("trust"),
            aggregator=n.boolean("aggregator"),
            owners=n.name_list("owners"),
            min_owners=n.integer("min_owners", 1),
            release=n.choice("release", ("dp", "exact")),
            epsilon=n.number("epsilon", 0.0),
            delta=n.number("delta", 0.0),
            dp_noise_multiplier=n.number("dp_noise_multiplier", 0.0),
            dp_clip=n.number("dp_clip", 0.0),
            store=n.path_("store"),
            max_store_bytes=n.integer("max_store_bytes", 0),
            pool_size=n.integer("pool_size", 1),
            max_forwards=n.integer("max_forwards", 1),
            curve_secret=node_secret,
            broker_key=node_broker_key,
            metrics_port=n.integer("metrics_port", 0),
            args=n.strings("args"),
        )
    return ClusterSpec(file, name, broker, nodes, start_timeout, demo)
