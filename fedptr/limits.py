"""Every knob of fedptr in one place: timeouts, sizes and pool bounds, each with its unit.

Processes take their defaults from here; the broker and node command lines override some of
them with flags of the same name.
"""

from __future__ import annotations

# --- deadlines (seconds) -----------------------------------------------------------------
CALL_TIMEOUT_S = 30.0
"""Default deadline of one awaited client call (send, get, move, an operation, objects)."""

CONNECT_TIMEOUT_S = 10.0
"""Deadline for registering with the broker (s); `fedptr.connect` uses its `timeout` when that is
shorter, so a wrong address fails within the deadline the caller gave."""

HOP_MARGIN_S = 0.25
"""Time a forwarding node keeps for itself: the next hop gets the caller's budget minus this,
so the error of the deepest hop reaches the caller before the caller's own deadline fires."""

MIN_HOP_BUDGET_S = 0.05
"""Smallest budget a forwarded request is given, however little the caller had left."""

CLUSTER_START_TIMEOUT_S = 60.0
"""Deadline for a local cluster's processes to start and register (torch import included)."""

CLUSTER_STOP_GRACE_S = 5.0
"""After SIGTERM, how long a local cluster waits for a process before it sends SIGKILL."""

HEARTBEAT_INTERVAL_S = 1.0
"""A peer or broker that sent nothing for this long sends a heartbeat."""

HEARTBEAT_LIVENESS = 3
"""Missed heartbeat intervals after which the other side is taken for dead (Paranoid Pirate's 3)."""

# --- sizes (bytes / counts) --------------------------------------------------------------
MAX_HEADER_BYTES = 1 << 20
"""Largest msgpack header a decoder accepts (1 MiB)."""

MAX_MESSAGE_BYTES = 4 << 30
"""Largest single frame a socket accepts (ZMQ_MAXMSGSIZE), 4 GiB."""

MAX_FRAMES = 4096
"""Most frames one message may carry (header plus tensor buffers)."""

MAX_NDIM = 32
"""Most dimensions a tensor on the wire may have."""

MAX_CONTAINER_LEN = 65536
"""Longest msgpack array or map in a header."""

MAX_STR_BYTES = 4096
"""Longest msgpack string in a header (names, op names, error messages are cut to this)."""

MAX_NAME_BYTES = 64
"""Longest worker or client name."""

STREAM_THRESHOLD_BYTES = 4 << 20
"""Buffer frames larger than this (4 MiB) travel as a stream of chunks, not as one frame."""

STREAM_CHUNK_BYTES = 1 << 20
"""Size of one chunk of a streamed buffer (1 MiB)."""

DIRECT_STREAM_THRESHOLD_BYTES = 1 << 18
"""With CURVE on, buffer frames larger than this (256 KiB) stream as chunks when a direct data path
to their peer is open (`fedptr.direct`): all but a small first chunk then skip the broker's CURVE
(a 1 MiB send: 1.9-2.7 ms so, 7-10 ms whole through the broker). Without CURVE the broker relays
a buffer whole faster than the path streams it (1.2-1.3 ms against 2.1-2.7 ms for 1 MiB: one hop
and one message fewer to wake, nothing to decrypt), so buffers stream, and take the path, from
`STREAM_THRESHOLD_BYTES` only."""

DIRECT_FIRST_CHUNK_BYTES = 4 << 10
"""Size of a buffer's first chunk when the rest takes a direct path (4 KiB): the first goes
through the broker, in order before its message, which the receiver then holds until the rest is in."""

STREAM_BUFFER_ALIGN_BYTES = 4096
"""A reassembled buffer starts at a multiple of this many bytes (a page). numpy's own buffers
start 16 bytes past one, and the kernel's copy into such a buffer (`preadv` of a shared-memory
file, `fedptr.shm`) ran ~3x slower on this VM's CPU (AMD EPYC: 64 MiB in 32 ms, against 11 ms
page-aligned; 32 bytes past a page cost ~14 ms): the receiving end of every same-host 64 MiB
transfer paid it."""

STREAM_MAX_BYTES = 16 << 30
"""Most bytes of partly received streams a receiver keeps at once, from all peers (16 GiB); more is refused."""

STREAM_MAX_BYTES_PER_PEER = 4 << 30
"""Most bytes of partly received streams a receiver keeps at once for one peer (4 GiB, one largest
frame): a peer announcing huge buffers uses up its own budget, not everyone's."""

STREAM_TIMEOUT_S = 60.0
"""A partly received stream with no new chunk for this long is dropped (its sender died)."""

STREAM_PURGE_INTERVAL_S = 1.0
"""Most often a receiver looks for stale streams and refusals (s; at most every `STREAM_TIMEOUT_S`
when that is shorter): the look visits every peer holding one, and ran for every chunk, so a
client's aborts held over thousands of its sources cost the node milliseconds each (review13).
A stale one is dropped this much later at most."""

STREAM_MAX_REFUSED_PER_PEER = 1_024
"""Most refused streams a receiver remembers for one peer (count; ~300 bytes each, kept up to
`STREAM_TIMEOUT_S`), to answer each one's message with the reason. Past it, that peer's oldest is
forgotten: its message still fails (its buffer's frame is empty, no tensor), without the reason."""

STREAM_MAX_REFUSED = 16_384
"""Most refused streams a receiver remembers for all peers together (count; ~5 MB at ~300 bytes
each). Past it, the oldest refusal of the peer holding the most is forgotten: many peers each
within `STREAM_MAX_REFUSED_PER_PEER` (a client's sessions, or aborts) are bounded too, and a peer
that refuses itself most loses its own first."""

HELD_MAX_MESSAGES = 10_000
"""Most messages a receiver holds from one sender behind a message whose streamed chunks are
still arriving over the direct path; past it, that stream is refused and its message fails."""

DIRECT_CONNECT_TIMEOUT_S = 2.0
"""Longest the opening of a direct data path to a worker may take (a request through the broker,
a TCP connection, a CURVE handshake and a greeting); chunks go through the broker meanwhile."""

DIRECT_RETRY_S = 30.0
"""After a direct data path to a peer failed to open or broke, chunks go through the broker for
this long before it is tried again."""

DIRECT_MAX_KEYS = 1_024
"""Most peers' keys a worker's direct data socket admits at once: then the oldest admission whose
peer has not greeted is forgotten, or, every path being in use, a new peer gets no ticket."""

DIRECT_SEAL_OVERHEAD_BYTES = 1 << 16
"""Bytes a sealed direct-path message may add to its chunk (its envelope, 16 bytes of tag), 64 KiB:
with `STREAM_CHUNK_BYTES`, the largest frame a direct data socket reads (anyone may connect to it)."""

DIRECT_RCVHWM = 8
"""Messages (each at most a sealed chunk) one connection to a direct data socket may queue
before its sender waits: anyone may connect, and the node's zmq I/O thread reads on while its
loop is busy, so `SOCKET_HWM` let one stranger's connection hold 100,000 MiB of junk. A
stranger still holds about this many MiB per connection it keeps open."""

DIRECT_SHM_DIR = "/dev/shm"
"""Where a direct path's two ends on one host pass large chunks as files (`fedptr.shm`), once a
probe file proved they share it; "" turns shared memory off (every chunk is sealed and sent)."""

DIRECT_SHM_MIN_BYTES = 1 << 20
"""Chunks of at least this many bytes (1 MiB) take shared memory when the path has it: a smaller
one costs more in file calls than it saves in copies."""

DIRECT_SHM_FILE_BYTES = 4 << 20
"""Largest shared-memory file (4 MiB): the rest of a buffer goes as files of this size, and the
receiver reads one per turn of its loop (the whole rest of a 4 GiB buffer in one file held its
loop, heartbeats and every other peer, for seconds). Small files pipeline: the receiver reads one
while the sender writes the next. 64 MiB sends and gets on the idle machine: 1.07-1.11 GB/s with
64 MiB files (one file, nothing overlaps), 1.8-2.1 with 8 MiB, 2.0-2.1 with 4 MiB, 1.8-1.9 with 2 MiB."""

DIRECT_SHM_MAX_PENDING_BYTES = STREAM_MAX_BYTES_PER_PEER
"""Most bytes (4 GiB, one largest frame) a process keeps in shared-memory files its receivers have
not taken yet: each is kept up to `STREAM_TIMEOUT_S` (a receiver that died, or never reads), and
/dev/shm is the host's memory. Past it a chunk goes sealed over the path instead."""

DIRECT_SHM_SPARE_S = 1.0
"""A shared-memory file its receiver read is handed back to its sender (renamed), which writes
the same path's next chunk into it (its pages already there: ~10 ms of CPU less per 64 MiB,
both ends together); one not written again within this long (seconds) after it was handed back
(1-2 s: files are looked at once per period) is unlinked."""

DIRECT_SHM_SWEEP_S = 0.5
"""A worker sweeps the shared-memory directory this long (seconds) after a peer that shared
memory with it left (a client: after its path to such a worker closed), once for every
departure meanwhile: a sweep reads the whole directory on the loop (~11 us a file of ours:
20,000 took 218 ms), and a round's end may see many leave."""

DIRECT_SHM_STALE_S = 2 * STREAM_TIMEOUT_S
"""A shared-memory file that a process's sweeps saw unchanged for this long (seconds, monotonic
clock) is a leftover, whoever made it: swept by the next sweep (its sender unlinks it after
`STREAM_TIMEOUT_S` anyway, unless it crashed)."""

MAX_LISTED_OBJECTS = 4_000
"""Most objects one `objects()` listing returns (its header must stay under MAX_HEADER_BYTES)."""

PREVIEW_NUMEL = 16
"""Tensors up to this many elements show their values in `objects()`; larger ones show shape only."""

MAX_IN_FLIGHT = 100_000
"""Most requests one peer keeps unanswered. Past it, awaited calls wait for room (backpressure)
and pipelined operations raise OverloadedError rather than queue without bound."""

MAX_VALUE_DEPTH = 16
"""Deepest nesting of lists and maps in an operation's arguments."""

MAX_EXT_BYTES = 4096
"""Longest msgpack extension value (a tensor's dtype and shape, or a reference)."""

MAX_MODULE_LAYERS = 256
"""Most layers one model sent as a spec may have."""

MAX_MODULE_DEPTH = 8
"""Deepest nesting of containers (Sequential) in a model sent as a spec."""

MAX_GRAPH_STEPS = 4096
"""Most steps (inputs, operations, output) in a model that travels as a graph (fedptr/graphs.py)."""

MAX_GRAPH_TENSOR_NUMEL = 1 << 26
"""Most elements in one parameter or buffer a model graph declares outside its layers (256 MiB of float32)."""

# --- sockets and event loops -------------------------------------------------------------
SOCKET_HWM = 100_000
"""Messages a zmq socket queues per peer, each way, before sends are refused (ZMQ_SNDHWM/RCVHWM);
the broker's `--hwm` flag."""

BATCH_MAX_MESSAGES = 128
"""Messages a link packs into one BATCH before it sends it, within a loop turn (the rest of
the turn's messages start the next one). A turn that issues thousands of ops then neither holds
every message until its end (a client's messages outlived two young GC collections and were
promoted: a full pass, ~0.2 s with torch loaded, every ~10,000 pipelined ops) nor makes the
worker wait for the last of them before it starts. At 128 a multipart more costs a few µs in
each process, shared by 128 messages."""

DRAIN_BATCH = 256
"""Messages a link handles per read callback before other callbacks (timers) get a turn."""

RECV_COPY_BYTES = 1024
"""Frames a link (or the broker, without CURVE) receives shorter than this (1 KiB: envelopes,
headers, small replies) are copied into bytes at once, and the zmq.Frame is freed. A BATCH
holds four frames per message while it is handled: as Frame objects they made the client's
cyclic GC promote them to its oldest generation (whose full passes cost a client with torch
loaded ~0.2 s each), and the broker relayed each by allocating another Frame (2-3 µs of
broker CPU per pipelined op)."""

INLINE_FRAME_BYTES = 1024
"""Body frames up to this size (1 KiB: a msgpack header, a small tensor's bytes) travel inside
their message's head frame (`fedptr.envelope`), from the first body frame up to the first larger
one; larger ones stay frames of their own, never copied. libzmq (and CURVE) costs about as much
per frame as a memcpy of some kilobytes, and the broker copies each inlined part once when it
re-makes a head, so the bound is kept where the copy costs less than the frame."""

ACKS_MAX_REPLIES = BATCH_MAX_MESSAGES
"""Most replies one ACKS record stands for (fedptr/envelope.py): as many as a batch holds
messages, so that a merged batch leaves when the unmerged one would; an ACKS claiming more is
refused as malformed."""

BATCH_MAX_RECEIVED = 65_535
"""Most messages one received BATCH may hold; a batch that holds more is refused whole as
malformed (the bound the uint16 counts of protocol FPTR2 gave)."""

BROKER_DRAIN_BATCH = 10_000
"""Messages the broker routes per wake before it looks at its clock and heartbeats."""

WRITE_RETRY_S = 0.001
"""How often a link retries sending while the broker's queue for it is full (the socket's FD
signals reads only)."""

POLL_INTERVAL_S = 0.02
"""How often a local cluster checks whether its processes have started or registered."""

# --- privacy policy ----------------------------------------------------------------------
MIN_OWNERS = 2
"""Fewest distinct data owners a released aggregate must combine (`fedptr-node --min-owners`)."""

DP_DELTA = 1e-5
"""A data owner's delta: the (epsilon, delta) of its budget (`fedptr-node --delta`)."""

BUDGET_RDP_CACHE_SIZE = 1024
"""Distinct releases (noise multiplier, sampling rate, steps) whose RDP curve a node keeps
(`nodes/budget.py`; ~60 floats, ~0.5 KB, each): pricing one takes ~0.1-0.15 s, and a charge
prices the owner's whole history, so without it each release cost that much per earlier one."""

DP_CLIP = 1.0
"""C: the L2 bound a data owner clips its contributions to (`--dp-clip`)."""

DP_NOISE_MULTIPLIER = 1.0
"""sigma: the noise multiplier a data owner charges each contribution for (`--dp-noise-multiplier`);
the aggregator's noise has standard deviation at least sigma * C."""

DP_NOISE_GRID_BITS = 40
"""Bits below the larger of a release's noise standard deviation and its sum's bound (a power of
two at or above each) that the sum and the noise are rounded to before they are added
(`nodes/mechanisms.py`, `noised`): the addition is then exact, and a release's low bits say
nothing of what was added to the noise. 40 bits leave the sum within 2^-40 of its value, far
below the noise, and keep the sum of noise and bound under float64's 53 bits."""

DP_NOISE_SPAN = 16.0
"""Standard deviations a mechanism's noise draw can reach, for the range check of a release
(`nodes/mechanisms.py`, `check_range`): torch's float64 normal draws (Box-Muller on 53-bit
uniforms) stay within 8.6. A release is refused, from public figures and before any noise is
drawn, unless its sum's bound plus this many deviations fits its dtype twice over: a sum or a
noise that overflowed to infinity was no longer the Gaussian mechanism charged for (twenty-second
red-team round)."""

DP_MIN_GRAD_NORM = 1e-100
"""Smallest DP-SGD clip bound C (`dp.train(max_grad_norm=)`, an L2 norm of a per-sample gradient):
far above float64's subnormals (below 2.2e-308), where a clipped gradient's rounding error is no
longer small next to C (with C = 1e-323 each clipped gradient came out 2 C)."""

SECAGG_RING_BITS = 32
"""Bits k of the ring Z_{2^k} secure aggregation masks in (bits per coordinate on the wire): the
quantization scale is chosen so that the noised sum of all owners of a round fits in k - 1 bits."""

SECAGG_NOISE_TAIL = 12.0
"""Standard deviations of the summed noise that the quantization range leaves room for: the sum
wraps around the ring with probability below 1e-30 per coordinate."""

SECAGG_DEGREE = 8
"""Neighbours each owner of a secure aggregation round masks with and shares its secrets with
(SecAgg+'s sparse graph; rounds of fewer owners use the complete graph)."""


def secagg_default_colluders(owners: int) -> int:
    """The collusion bound c of a secure aggregation round of `owners` owners when its client
    names none: floor((k - 1) / 3) owners, k = min(owners - 1, `SECAGG_DEGREE`) the default
    neighbour degree (Bonawitz et al.'s fraction, below a third, taken per neighbourhood, where
    the colluders would need to be to get both shares of one owner). It keeps the graph sparse
    (a larger c grows the degree to at least 3c + 1) and leaves the unmask phase
    n - floor((n + c) / 2) - 1 dropouts. Owners, not seconds."""
    return (min(owners - 1, SECAGG_DEGREE) - 1) // 3


SECAGG_PHASE_TIMEOUT_S = 10.0
"""Longest an aggregator waits for the owners' answers in one phase of a secure aggregation round;
an owner that has not answered by then has dropped out (the client's deadline may cut it shorter)."""

SECAGG_ROUND_TIMEOUT_S = 120.0
"""How long an owner keeps a secure aggregation round it joined (its keys and the shares it holds)
before it forgets it: a round not finished by then cannot be unmasked."""

SECAGG_MAX_ROUNDS = 64
"""Most secure aggregation rounds an owner has joined and not finished at once."""

# --- node execution ----------------------------------------------------------------------
NODE_POOL_SIZE = 64
"""Most torch computations one node runs or waits on at once (asyncio-pool size)."""

SEND_COPY_MAX_BYTES = 1 << 20
"""Tensors up to this many bytes are copied when sent (a pipelined send returns before its bytes
leave); bigger ones are sent from their memory, and their send fails if they change before the
worker has them (await the send before changing them in place)."""

TENSOR_VIEW_MIN_BYTES = 1 << 16
"""Tensors of at least this many bytes travel as views of their memory (`fedptr.tensors`: a
sent tensor's own bytes, a received frame's); smaller ones are copied, in one call where numpy
knows the dtype: the copy costs less than setting a view up (~1 µs against ~4 for 4 elements),
and a received frame is freed at once, whatever its address."""

MAX_PLAN_OPS = 10_000
"""Most operations in one plan (`fedptr.plan`)."""

MAX_OP_RESULTS = 256
"""Most results (each a stored object and a pointer) of one multi-output operation (``split``,
``unbind``): a count decided by shapes must not flood a store with entries."""

MAX_PLAN_INPUTS = 1024
"""Most input objects (arguments and captured pointers) of one plan."""

PLAN_INLINE_OPS = 256
"""Most operations of a plan a node runs on its event loop before it continues on its thread
(each inline one also has operands of at most `OFFLOAD_NUMEL` elements, as single operations)."""

MAX_PLANS_PER_PEER = 64
"""Most plans a node keeps for one client."""

NODE_MAX_ORDERED = 4096
"""Most requests a node holds back, over all peers, behind their peers' deferred computations
(program order); past it the node stops reading requests until they drain."""

CLIENT_MAX_QUEUED_REQUESTS = 2048
"""Most requests (a count) of one client a node holds back behind that client's deferred
computations; past it the client's further requests are refused with QuotaExceededError (its
unanswered deletes excepted), so one client cannot fill `NODE_MAX_ORDERED` and pause the node's
reads for everyone."""

CLIENT_MAX_OBJECTS = 1_000_000
"""Most objects (a count) one client may hold on one node (`fedptr-node --max-client-objects`);
past it what would create one more is refused with QuotaExceededError."""

CLIENT_MAX_BYTES = 0
"""Most tensor bytes one client's objects may hold on one node (`fedptr-node --max-client-bytes`;
0: no cap but the node's `--max-store-bytes`)."""

NODE_MAX_FORWARDS = 10000
"""Most forwarded requests a node keeps waiting at once; past it requests are refused as Overloaded."""

REPLY_CACHE_SIZE = 10_000
"""Recent replies a node keeps, so a replayed request is answered from memory, not run twice."""

REPLY_CACHE_MAX_TENSOR_BYTES = TENSOR_VIEW_MIN_BYTES - 1
"""Replies holding more tensor bytes than this (64 KiB less one) are not kept; a replay of such a
Get is refused instead. Below `TENSOR_VIEW_MIN_BYTES`, so a kept reply holds copies, never a view
of a stored tensor that a later write would change (a get's reply is not copied otherwise)."""

REPLY_CACHE_MAX_BYTES = 64 << 20
"""Most tensor bytes the kept replies of one node hold together (64 MiB); the oldest go first."""

WRITE_BATCH_CHANGES = 1024
"""Most changes (writes, removals) the write-ahead thread carries out before one directory fsync."""

WRITE_BATCH_BYTES = 64 << 20
"""Most tensor bytes (64 MiB) the write-ahead thread writes in one batch."""

REMOVE_BATCH_CHANGES = 16
"""Most objects the write-ahead thread forgets (unlinks) between two batches of writes."""

WRITE_AHEAD_CLOSE_S = 10.0
"""How long a closing node waits (s) for its write-ahead thread to write what is queued."""

RESOLVE_TIMEOUT_S = 2.0
"""Deadline (s) of each question a node asks to settle a hand-over in doubt."""

RESOLVE_RETRY_S = 0.5
"""Pause (s) between the questions about a hand-over in doubt while the other side does not answer."""

OFFLOAD_NUMEL = 1 << 16
"""Computations whose inputs hold more elements than this run in a thread, off the event loop."""

OFFLOAD_THREADS = 2
"""Threads for offloaded torch work (this machine has 2 cores)."""

NODE_THREADS = 0
"""torch intra-op threads per node process (`fedptr-node --threads`); 0 keeps torch's default of
one per core, which suits a node alone on its machine. Nodes that share a machine should take
about cores / processes: torch's idle threads spin between tiny ops, so N co-located nodes with a
thread per core each busy-wait against one another. `local_cluster` passes 1
(`LOCAL_CLUSTER_THREADS`)."""

LOCAL_CLUSTER_THREADS = 1
"""torch intra-op threads per node process under `local_cluster` (all its processes share one
machine): its default for ``threads``."""

NODE_GC_THRESHOLD = 100_000
"""Container allocations (net of frees) between two young-generation garbage collections in a
node (Python's default: 700). Every small pipelined op allocates a few dozen containers and keeps
~6 until its result is deleted; a collection traverses every young object still alive, so the
fewer it meets, the less it costs: at 700 it ran every ~25 ops (~15% of the node's CPU per op
once the start-up heap is frozen), at 10,000 every ~1,700 ops while 15,000 results were held
(~0.5-0.8 µs per op, a third of it in the middle generation's collections), at 100,000 not once
in that run. The node's op path makes no reference cycles (a failed entry's error, its chained
ones and a failed offloaded run's keep no traceback: `nodes.store.without_frames`), so what
waits is the cyclic garbage of other code: at most this many containers (~10-20 MB of them) and
what they hold; a young collection that meets them all takes ~12 ms (~1.2 ms per 10,000 objects
traversed, measured)."""

HEAP_TRIM_DELAY_S = 1.0
"""After a client leaves, how long (s) a node or the broker waits before it gives the free pages
of its malloc heaps back to the OS (`fedptr/heap.py`); departures meanwhile share the trim."""

# --- broker ------------------------------------------------------------------------------
BROKER_MAX_PEERS = 10000
"""Most registered names (workers and clients) a broker keeps."""

BROKER_MAX_CLIENT_BINDINGS = 100_000
"""Client names a CURVE broker remembers the key of (so none can be taken over by another key)."""

FANOUT_MAX_WIDTH = 64
"""Most destinations (a count) one fan-out names (`fedptr.broadcast` sends to more in several):
the broker sends a fan-out's body once per destination, so this bounds the sends, and the
queued bytes, that one message can ask of it."""

BROKER_LOG_EVERY = 1000
"""The broker logs the 1st and then every Nth dropped garbage message, so a flood cannot flood the log."""

# --- operations: status, metrics, logs, progress -----------------------------------------
STATUS_TIMEOUT_S = 3.0
"""Deadline of `fedptr status` and `fedptr objects` for each question (the broker's registration,
its table, each worker's figures): a worker that has not answered by then is shown unresponsive."""

STATUS_WIDE_COLUMNS = 140
"""Terminal width (columns) from which `fedptr status` adds bytes held, memory, traffic and uptime
to its workers table; narrower (80 columns, say) it leaves them to ``--json``, so that every row
stays on one line."""

GUARD_META_TABLE_SIZE = 4096
"""Signatures (an op, its operands' shapes and dtypes, its other arguments) whose meta-run result
a node keeps (nodes/guard.py): a private op met again skips its meta run (tens of µs); past it,
new signatures run on the meta device each time."""

INFERRED_BY_OPERANDS = 4096
"""Entries of the client's table of inferred results by op and operand identity
(fedptr/pointer.py, a tuple and a few meta tensors each): emptied when full, then refilled as
ops are issued (a miss costs the structural lookup of `fedptr.meta`, ~3 µs)."""

OP_TEMPLATE_TABLE_SIZE = 1024
"""Entries (one per op name, number of pointer operands and deadline budget in ms; a header of
a few dozen bytes each, cut in pieces) of the client's table of encoded `Op` requests with
their ids left out (fedptr/session.py, `_op_body`). Past it, new ones are encoded in full."""

OK_HEADER_TABLE_SIZE = 1024
"""Entries (one per distinct shape and dtype; a few hundred bytes each at most) of each of the
tables of `Ok` replies (fedptr/wire.py): encoded ones by shape and dtype, and decoded ones by
their header bytes. Past it, new ones are encoded (or decoded) each time."""

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the latency histogram buckets, per request kind (node) and per
command (broker), as Prometheus exposes them; a last bucket holds everything above."""

METRICS_HOST = "127.0.0.1"
"""Address the Prometheus endpoint (``--metrics-port``) listens on unless ``--metrics-host`` says otherwise."""

PROGRESS_ENV = "FEDPTR_PROGRESS"
"""Environment variable that turns transfer progress bars on (``1``) for clients that did not
say (`fedptr.connect(progress=...)`); bars show only when stderr is a terminal."""

PROGRESS_REFRESH_PER_S = 8.0
"""How often a progress bar is redrawn, per second."""
