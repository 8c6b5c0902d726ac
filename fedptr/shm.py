"""Same-host shared memory for the direct path's bulk buffers (`fedptr.direct`).

Between two processes on one host, the AES-GCM direct path still costs a seal, two kernel socket
copies and an open per byte, where torch.rpc's TensorPipe copies through shared memory. When a
path's two ends share a ``/dev/shm`` (`limits.DIRECT_SHM_DIR`), a large chunk goes as a file
there instead: the sender writes the buffer once into a file, and sends only its name, size and
inode over the path (sealed: authenticated and encrypted like any chunk); the receiver opens it,
checks it, reads it into the reassembly buffer and hands it back to the sender, who writes the
path's next chunk into it: one copy each end (the sender's write, the receiver's read), no
crypto, no socket, and no fresh tmpfs pages once a path is warm (a fresh 64 MiB cost the
sender's kernel ~6 ms more than a rewrite, and the receiver ~4 ms to free on its close). It is
read, never mapped: the sender holds a descriptor of the file and writes to it again (see
`Incoming.place`).

* **Proven, never assumed.** The connecting end writes a probe file holding a random secret
  and names it, with its boot id, in its sealed greeting; the worker answers "shared" only if
  its boot id is the same and it reads that secret from that file, owned by its own uid. Across
  hosts, or with no such directory, every chunk takes the AES-GCM path as before.
* **Bound to the path.** A file's name is ``fedptr-<pid namespace>-<pid>-<tag>``, the tag the
  first 128 bits of HMAC-SHA256 under the path's secret token of the direction and a counter
  (`tag`): the receiver accepts only the name its own path's secret gives for a counter above
  the last it took, so a peer cannot name another path's file (nor guess one: the names are
  unguessable without that path's secret), nor replay one of its own.
* **Checked once, on the open descriptor** (no TOCTOU): opened ``O_NOFOLLOW`` relative to the
  directory (the name's shape admits no ``/``), then ``fstat``: a regular file, one link, owned
  by our uid, of the announced size and inode. Anything else, or a file gone, is a
  `ProtocolError` and its stream is refused (its message fails at once, typed).
* **Handed back, to its own path only.** Once read, the receiver renames the file to its
  *spent* name (`Directory.spent_name`: the maker's prefix and a second HMAC tag under the same
  path secret and counter); the maker writes that same path's next chunk into it (`write`), after
  checking on the descriptor it reopened that it is still its file (its inode, one link, its
  uid, mode 0600), else it makes a fresh one. A receiver that kept a descriptor (or a link) can read only
  what its own path sends it next, which it gets anyway; what it already read is in its own
  memory, where later writes do not reach.
* **Nothing leaks.** The receiver unlinks a file it refused (over a stream budget, say, without
  reading, or not as announced); the sender unlinks a file handed back and not written again
  within `limits.DIRECT_SHM_SPARE_S`, its own after `limits.STREAM_TIMEOUT_S` whatever happened
  (a receiver that died, a message lost), and every one when its path closes; it keeps at most
  `limits.DIRECT_SHM_MAX_PENDING_BYTES` in files not taken or handed back (more goes sealed,
  `fedptr.direct`). A crashed sender's files (written and never announced, or handed back to
  it) are swept when a path next opens on the host, by the worker when a peer that shared
  memory with it leaves (`DirectPaths.forget`), and by the client when its path to a worker
  that shared memory with it closes (a killed worker's reply files): those whose creator (same
  pid namespace) is gone, and any that sweeps saw unchanged for `limits.DIRECT_SHM_STALE_S` (by
  the monotonic clock: a wall-clock step makes no live file look old).

Limitation: files are created 0600 and named unguessably, but a process of the same uid can read
or write any file of that uid (as it can, mostly, read and write the peers' memory); the path is
offered only between processes of one uid on one host.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hmac
import mmap
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedptr import limits
from fedptr.errors import ProtocolError

_NAME = re.compile(rb"fedptr-([0-9a-f]{1,16})-([0-9]{1,10})-([0-9a-f]{32})\Z")
_DESCRIPTOR = struct.Struct("!QQQ")  # counter, size, inode; then the name
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REWRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_MODE = 0o600
"""Our files' permissions: their owner's alone (a file handed back otherwise is not written again)."""
_TAG_BYTES = 16
_SPENT = b" spent"
"""Appended to a direction in the tag of the name a receiver hands a file back under."""
_PROBE_BYTES = 16
_LAYOUT = b"files-v2"
"""Named in the probe's offer: files start at offset 0 and are handed back once read. A peer of
the layout before (a file laid out as its whole buffer, unlinked once read; an offer of three
words) and one of this layout find no shared memory between them, and use sealed chunks."""


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def _pid_namespace() -> str:
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "0"


def tag(token: bytes, direction: bytes, counter: int) -> bytes:
    """The name part that binds a file to one path (its secret `token`), one direction of it
    and one counter value: unguessable without the token."""
    digest = hmac.digest(token, b"fedptr shm " + direction + counter.to_bytes(8, "big"), "sha256")
    return digest[:_TAG_BYTES].hex().encode()


@dataclass
class Directory:
    """This process's side of the shared directory: writing files, reading the peer's, the probe."""

    path: str = field(default_factory=lambda: limits.DIRECT_SHM_DIR)
    _fd: int = -1
    _prefix: bytes = b""
    _seen: dict[bytes, tuple[tuple[int, int], float]] = field(default_factory=dict)
    """Files of ours (by uid) the last sweep saw: name -> ((inode, mtime in ns), since when on the
    monotonic clock it has been seen so). A sweep ages files by what it saw, never by mtime
    arithmetic against the wall clock, which a step forward made call live files stale."""

    def usable(self) -> bool:
        """Whether the directory can be opened (once; False for good when it cannot)."""
        if self._fd == -1:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                self._fd = -2
            self._prefix = f"fedptr-{_pid_namespace()}-{os.getpid()}-".encode()
        return self._fd >= 0

    def write(
        self, name_tag: bytes, counter: int, data: memoryview, spent: bytes = b"", inode: int = 0
    ) -> tuple[bytes, bytes] | None:
        """Write `data` into a file named for `name_tag`: a fresh 0600 file, or, given `spent`
        (the name a receiver handed one of our files back under, `spent_name`) and its `inode`,
        that file renamed and rewritten in place (its pages are already there: a fresh 64 MiB
        cost the kernel ~6 ms more to write than one rewritten, and the receiver ~4 ms to free
        on its close); a spent file that is not ours as written (checked on its descriptor) is
        left and a fresh one made. Returns its name and its descriptor for the receiver; None
        when the directory is unusable or refuses it (full, say: the caller sends the bytes
        another way)."""
        if not self.usable():
            return None
        name = self._prefix + name_tag
        fd = self._reopen(spent, inode, name) if spent else -1
        try:
            if fd == -1:
                fd = os.open(name, _CREATE_FLAGS, _MODE, dir_fd=self._fd)
        except OSError:
            return None
        try:
            view = data.cast("B")
            if os.fstat(fd).st_size != view.nbytes:
                os.ftruncate(fd, view.nbytes)  # a rewritten file shrinks (or grows) to its new size
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], done)
            inode = os.fstat(fd).st_ino
        except OSError:
            self.unlink(name)
            return None
        finally:
            os.close(fd)
        return name, _DESCRIPTOR.pack(counter, view.nbytes, inode) + name

    def _reopen(self, spent: bytes, inode: int, name: bytes) -> int:
        """A descriptor of our file now named `spent`, renamed to `name`, for writing; -1 when it
        is gone or not the file we made (another inode, more than one link, another owner, or
        opened to anyone but its owner: a receiver's chmod would otherwise let another uid read
        the next chunk)."""
        try:
            fd = os.open(spent, _REWRITE_FLAGS, dir_fd=self._fd)
        except OSError:
            return -1
        try:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_ino != inode
                or st.st_nlink != 1
                or st.st_uid != os.geteuid()
                or stat.S_IMODE(st.st_mode) != _MODE
            ):
                os.close(fd)
                return -1
            os.rename(spent, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError:
            os.close(fd)
            return -1
        return fd

    def spent_name(self, name: bytes, token: bytes, direction: bytes, counter: int) -> bytes:
        """The name file `name` (of counter `counter`, written for one `direction` of the path
        with secret `token`) is handed back under once its receiver read it: its maker's prefix,
        and a tag of its own under the same secret."""
        return name[: -2 * _TAG_BYTES] + tag(token, direction + _SPENT, counter)

    @staticmethod
    def inode(descriptor: bytes) -> int:
        """The inode a descriptor `write` returned names."""
        return int(_DESCRIPTOR.unpack_from(descriptor)[2])

    def exists(self, name: bytes) -> bool:
        """Whether a file named `name` is in the directory."""
        try:
            os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def unlink(self, name: bytes) -> None:
        """Remove a file of ours, if it is still there."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._fd)

    def take(self, descriptor: bytes, token: bytes, direction: bytes, after: int) -> Incoming:
        """The file a peer's `descriptor` names, to be read where it belongs (`Incoming`). One
        whose name is not what the path's `token` gives for its `direction` and counter, or
        whose counter is not above `after` (a replay), yields an Incoming that fails typed."""
        if len(descriptor) <= _DESCRIPTOR.size:
            return Incoming(self, b"", 0, 0, 0, "a malformed shared-memory descriptor")
        counter, size, inode = _DESCRIPTOR.unpack_from(descriptor)
        name = bytes(descriptor[_DESCRIPTOR.size :])
        shape = _NAME.match(name)
        if (
            counter <= after
            or shape is None
            or not hmac.compare_digest(shape.group(3), tag(token, direction, counter))
            or not self.usable()
        ):
            return Incoming(self, b"", size, 0, 0, "a shared-memory name not of this path")
        return Incoming(self, name, size, inode, counter, "", self.spent_name(name, token, direction, counter))

    # --- the probe ----------------------------------------------------------------------
    def probe(self) -> tuple[bytes, bytes] | None:
        """Write a probe file: (its name, the offer to put in the greeting), or None."""
        secret = secrets.token_bytes(_PROBE_BYTES)
        name_tag = secrets.token_hex(16).encode()
        written = self.write(name_tag, 0, memoryview(secret))
        if written is None:
            return None
        return written[0], b" ".join([_boot_id(), written[0], secret.hex().encode(), _LAYOUT])

    def check_probe(self, offer: bytes) -> bool:
        """Whether the peer that made `offer` shares this directory with us: same boot, and the
        probe file it names, ours by uid, holds the secret it says."""
        parts = offer.split(b" ")
        if len(parts) != 4 or parts[3] != _LAYOUT or not parts[0] or parts[0] != _boot_id():
            return False
        if _NAME.match(parts[1]) is None:
            return False
        if not self.usable():
            return False
        try:
            fd = os.open(parts[1], _OPEN_FLAGS, dir_fd=self._fd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size != _PROBE_BYTES:
                return False
            return hmac.compare_digest(os.read(fd, _PROBE_BYTES + 1).hex().encode(), parts[2])
        except OSError:
            return False
        finally:
            os.close(fd)

    def sweep(self) -> int:
        """Unlink files left by senders that died (ours by uid, their creator gone from our pid
        namespace) or that sweeps saw unchanged (name, inode, mtime) for
        `limits.DIRECT_SHM_STALE_S` of the monotonic clock; how many."""
        if not self.usable():
            return 0
        namespace = _pid_namespace().encode()
        swept = 0
        now = time.monotonic()
        seen, kept = self._seen, {}
        uid = os.geteuid()
        stale = limits.DIRECT_SHM_STALE_S
        for entry in os.scandir(self._fd):
            name = os.fsencode(entry.name)
            shape = _NAME.match(name)
            if shape is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid != uid:
                continue
            mark = (st.st_ino, st.st_mtime_ns)
            before = seen.get(name)
            since = before[1] if before is not None and before[0] == mark else now
            if now - since >= stale or (shape.group(1) == namespace and not _alive(int(shape.group(2)))):
                self.unlink(name)
                swept += 1
            else:
                kept[name] = (mark, since)
        self._seen = kept
        return swept

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another uid's process: alive
        return True
    return True


_POPULATED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
"""A fresh buffer's mapping flags: private memory, its pages faulted in by the mmap call (Linux)."""


_MADV_POPULATE_WRITE = 23
"""Linux 5.14+: fault a range's pages in, writable, in one call (its bytes unchanged)."""


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None).madvise  # the C library already loaded into this process
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _populate(dest: np.ndarray[Any, Any]) -> None:
    """Fault in the whole pages of `dest` in one call, as MAP_POPULATE does for a fresh buffer:
    read into page by page, a fresh 256 MiB in 64 MiB files cost ~1.3 s against ~0.17 s. Best
    effort: an older kernel (EINVAL) or no such call leaves them to fault during the read."""
    fn = _madvise()
    if fn is None:
        return
    start = -(-dest.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (dest.ctypes.data + dest.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        fn(start, end - start, _MADV_POPULATE_WRITE)


def _fresh(nbytes: int) -> np.ndarray[Any, Any]:
    """A fresh private buffer of `nbytes` with its pages faulted in: in huge pages where it has
    whole ones (``MADV_HUGEPAGE``, as numpy asks for its large arrays; this kernel gives them on
    request only), which the kernel zeroes and maps ~3x faster than 4 KiB pages; else
    ``MAP_POPULATE``."""
    if nbytes >= _HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE") and _madvise() is not None:
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(OSError):
            area.madvise(mmap.MADV_HUGEPAGE)
        buf = np.frombuffer(area, dtype=np.uint8)
        _populate(buf)
        return buf
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=_POPULATED), dtype=np.uint8)


_HUGE_PAGE = 2 << 20


@dataclass
class Incoming:
    """A chunk's bytes in a peer's file, not read yet: the reassembly puts them in place
    (`place`) once its budgets allow, and `close` unlinks the file unless it was read (then it
    was handed back to its maker under `spent`). (A `fedptr.streams.Filler`.)"""

    directory: Directory
    name: bytes
    nbytes: int
    inode: int
    counter: int
    refused: str
    """Why this descriptor was refused before anything was opened ("" when it was not)."""
    spent: bytes = b""
    """The name the file is handed back under once read, for its maker to write again
    (`Directory.spent_name`)."""

    def __len__(self) -> int:
        return self.nbytes

    def place(self, buf: np.ndarray[Any, Any], offset: int) -> np.ndarray[Any, Any]:
        """Open the file once, check it on that descriptor, read its bytes into `offset` of
        `buf`, and hand it back to its maker (renamed to `spent`); returns the buffer that holds
        them: `buf`, or, when the file is most of it, a fresh anonymous buffer whose pages were
        populated at once, holding what `buf` held before `offset`. The file is never mapped:
        its maker keeps a way to write to it (it rewrites the file for its next chunk once handed
        back, and a peer may keep a descriptor), and a mapping, even a private one, would show
        those writes (until this process wrote each page): an object stored from it could change
        after it was checked, stored or handed to another owner. What was read is ours alone.
        Raises ProtocolError when it is not what was announced, or gone (then it is unlinked)."""
        if self.refused:
            raise ProtocolError(self.refused)
        name, self.name = self.name, b""  # whatever comes next, closing has nothing to unlink
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=self.directory._fd)
        except OSError as e:  # a symlink (O_NOFOLLOW), say: the name is this path's, so it goes too
            self.directory.unlink(name)
            raise ProtocolError(f"the shared-memory buffer cannot be opened ({e.strerror})") from None
        read = False
        try:
            st = os.fstat(fd)  # on the descriptor read from: what is checked is what is read
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
                raise ProtocolError("the shared-memory buffer is not a plain file of ours")
            if st.st_size != self.nbytes or st.st_ino != self.inode or offset + self.nbytes > len(buf):
                raise ProtocolError("the shared-memory buffer is not the size or the file announced")
            if offset + self.nbytes == len(buf) and 2 * self.nbytes >= len(buf):
                # most of the buffer at once: the kernel faults its pages in one call (a fresh
                # 64 MiB buffer faulted page by page while read into cost ~4x the read itself)
                fresh = _fresh(len(buf))
                fresh[:offset] = buf[:offset]
                buf = fresh
            else:  # one of a large buffer's files (`limits.DIRECT_SHM_FILE_BYTES`): its pages only
                _populate(buf[offset : offset + self.nbytes])
            dest = buf[offset : offset + self.nbytes].data
            done = 0
            while done < self.nbytes:
                n = os.preadv(fd, [dest[done:]], done)
                if n == 0:
                    raise ProtocolError("the shared-memory buffer is shorter than announced")
                done += n
            read = True
            return buf
        except OSError as e:
            raise ProtocolError(f"the shared-memory buffer cannot be read ({e.strerror})") from None
        finally:
            os.close(fd)
            # read: back to its maker (our copy is taken); else gone, as a refused file goes
            if not read or not self._hand_back(name):
                self.directory.unlink(name)

    def _hand_back(self, name: bytes) -> bool:
        try:
            os.rename(name, self.spent, src_dir_fd=self.directory._fd, dst_dir_fd=self.directory._fd)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Unlink the file unless it was opened (a refused stream's, say)."""
        if self.name:
            self.directory.unlink(self.name)
            self.name = b""
