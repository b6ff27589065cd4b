"""The etcd driver (``etcd://host:port[,host:port...]/key-prefix``): the cluster backend.

Built on etcd's gRPC API through aetcd's generated stubs (asyncio); install it with
``pip install 'flowstate-engine[etcd]'``. Every store lives under its own key prefix, so many
stores can share one etcd cluster.

URL:
    ``etcd://[user@]10.0.0.1:2379,10.0.0.2:2379/apps/orders?timeout=5&max_txn_ops=128``. Each
    ``host[:port]`` is one cluster member (port 2379 by default; IPv6 hosts in brackets); the
    path is the key prefix (percent-decoded; ``flowstate`` when empty). No segment of the prefix
    may start with ``~``: that character marks flowstate's own keys, which is what keeps a
    store at ``a`` from ever reading the keys of a store at ``a/b`` (every key of a store
    starts with ``<prefix>/~``). Options: ``timeout`` is the time budget of one call, retries
    and fail-over included (seconds, above 0, at most 3600, default 5); ``max_txn_ops`` is the
    server's ``--max-txn-ops`` (default 128). A commit compares one key per state, so it holds
    fewer than ``max_txn_ops`` states (about 120 with the default); the keys it writes beyond
    that count go into nested transactions. ``max_request_bytes`` is the server's
    ``--max-request-bytes`` (default 1.5 MiB, etcd's own): concurrent commits are grouped
    into requests below it, and a commit that alone writes more fails with a ``DriverError``
    that names its size and the limit. Each state a commit writes counts twice (its latest
    version and its log entry), plus its label postings, data and delay.

Authentication and TLS:
    ``etcd://user@host:2379/prefix`` authenticates as ``user``, with the password read from
    the environment variable ``FLOWSTATE_ETCD_PASSWORD`` when the URL is parsed: a password
    never goes in the URL, and it appears in no ``url``, repr, log line or error message.
    The driver gets a token per connection and a new one when etcd forgets it (tokens expire
    and do not survive a restart). ``?ca=/path/ca.pem`` connects over TLS, checking the
    server's certificate against that CA; ``&cert=/path/client.pem&key=/path/client.key``
    adds a client certificate (for ``--client-cert-auth``). The files are read by
    ``open()``. A wrong password, a certificate the other side refuses, or plain text
    spoken to a TLS server fail at once with a ``DriverError``: retrying cannot help.

Revisions:
    etcd's ``mod_revision`` is the flowstate revision: all keys a commit writes share it, so
    the states committed together share one revision. Commits form a chain through the head
    key ``~head``: each commit compares the head's ``mod_revision`` with the head it saw
    (``H``), and names every key it writes after ``H``, the revision before its own. Keys named
    ``<H>/<n>`` therefore sort in revision order, and a range read from ``<since_rev>`` returns
    exactly the versions after ``since_rev`` when ``since_rev`` is a revision of the store. Any
    other ``since_rev`` falls inside a commit's gap (``H < since_rev < its revision``); the
    first key after ``since_rev`` then belongs to the commit after that one, and its ``back``
    (the ``H`` of the commit before it) is where the read starts instead.

Key layout (``H``: 16 hex digits; ``n``: 4 hex digits, the position in the commit; ``ms``: 12
hex digits of the commit time in ms since the epoch; ``<id>``, ``<key>``, ``<value>``,
``<alias>`` and ``<name>`` percent-encoded, so that they contain no ``/``)::

    <prefix>/~meta                          layout version ("1"), written by the first open()
    <prefix>/~head                          {prev: H of the head commit, at: its time in ms};
                                            mod_revision = the store's head revision
    <prefix>/~s/<id>                        latest version of a state: the compare-and-set guard
                                            (mod_revision = the state's revision)
    <prefix>/~log/<H>/<n>                   every version, in revision order
    <prefix>/~lbl/<key>/<value>/<H>/<n>     one posting per label of every version {id, labels}
    <prefix>/~id/<id>/<H>/<n>               one posting per version of a state {id, labels}:
                                            the state's history
    <prefix>/~t/<ms>/<H>                    one per commit: commit time -> revision (since_time)
    <prefix>/~d/<id>/<alias>/<H>            data blobs (mod_revision = the version's revision)
    <prefix>/~dly/<H>/<n>                   delays, bound to the version at ``~log/<H>/<n>``
    <prefix>/~lease/<name>                  leases, attached to an etcd lease

Values are msgpack. A version's value is ``[state, back, token]``: the state with its commit
time (its revision is the key's ``mod_revision``), ``back``, and the commit's random token.
History lives in keys, never in etcd's MVCC history, so compaction loses nothing.

Costs and trade-offs:
    * A page costs O(limit) keys read: ``~log`` for unfiltered queries, the state's own
      postings for an ``id`` filter (labels checked on each posting), the postings of one
      label pair per AND-map for label filters (the map's first pair is walked; the others
      are checked on each posting, so put the most selective pair first). ``latest_only``
      checks each candidate against ``~s/<id>``, and ``since_latest`` with labels searches
      backwards in doubling windows of revisions (etcd can only range forwards with a
      limit); both cost O(limit + versions skipped). Reading a version by revision costs one
      round trip when it is the state's latest version and two otherwise; reading data at a
      revision ranges over that blob's versions on the server. All round trips of one page
      read one snapshot (the revision of its first read).
    * Each version is written twice (``~s`` and ``~log``) plus one history posting and one
      posting per label: a commit of one state with one label writes 6 keys (with ``~head``
      and ``~t``) in one ``Txn``.
    * Commits to one store are serialised by the head compare. One driver sends its
      concurrent commits together (group commit: one ``Txn`` compares every state of every
      commit in the group, and a conflict sends the others again without it), so the store's
      throughput does not fall with the number of flows of a process; a lone commit is sent
      from its caller's task. Processes writing the same store contend on the head key: the
      loser of a race reads the new head from the failed ``Txn`` and tries again at once,
      within its time budget.
    * ``committed_at`` is the writer's wall clock (UTC, ms), never below the head's time it
      compared against: commit times never decrease along revisions, across all writers.

Failures:
    gRPC and aetcd errors become ``DriverUnavailableError`` (connection lost, timeouts, no
    leader) or ``DriverError`` (anything else), with the original chained. Reads and lease
    calls are retried on the next endpoint within ``timeout``. A commit whose ``Txn`` got no
    answer is sent again with the same token; if an earlier attempt did land, the next
    attempt fails its head compare and the failed ``Txn`` reads back the first key of the
    earlier attempt, whose token proves it: the commit is acknowledged once, with the
    revision it really got, and never applied twice. Only when ``timeout`` runs out does the
    caller get ``DriverUnavailableError`` with the outcome unknown.

Watching:
    Each driver keeps one etcd watch stream, opened by ``open()``; the first ``wait_for_rev``
    creates a watch on ``~head`` on it, which every later waiter shares (a driver that only
    commits is sent no events). A broken stream is reopened on the next endpoint and the
    watch resumes from the revision after the last one it delivered (or after the head the
    driver last saw), so no commit is missed. If etcd compacted that revision meanwhile, the
    driver reads the head again and watches from the revision of that read. Commits through
    the driver itself wake waiters at once.

Leases:
    ``acquire_lease`` grants an etcd lease (its ttl rounded up to whole seconds) and creates
    ``~lease/<name>`` attached to it if the key is absent (or held by the same holder); the
    token is the etcd lease id. ``renew_lease`` is one keep-alive, ``release_lease`` revokes
    the etcd lease, and etcd deletes the key itself when the lease expires. Lease keys never
    touch ``~head``: they do not move the store's revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import math
import os
import secrets
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote

import aetcd
import grpc
import msgspec
from aetcd import rpc

from flowstate._checks import describe, is_int, is_number, is_text
from flowstate._lifecycle import Lifecycle, not_open, warn_unclosed
from flowstate._query import StatesPage, StatesQuery
from flowstate._state import State
from flowstate.drivers import _args
from flowstate.drivers.base import (
    CommitRequest,
    CommitResult,
    DelayedState,
    DelaysPage,
    Driver,
    Lease,
    RevisionWaiters,
    StateWrite,
)
from flowstate.errors import (
    ClosedError,
    Conflict,
    ConflictError,
    DriverError,
    DriverUnavailableError,
    FlowstateError,
    InvalidURLError,
    NotFoundError,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence
    from typing import Self

__all__ = ["LAYOUT_VERSION", "PASSWORD_ENV", "EtcdDriver"]

logger = logging.getLogger("flowstate.drivers.etcd")

T = TypeVar("T")
D = TypeVar("D")

#: The key layout version this release writes and reads (``<prefix>/~meta``).
LAYOUT_VERSION: Final = 2

DEFAULT_PREFIX: Final = "flowstate"
DEFAULT_PORT: Final = 2379
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_MAX_TXN_OPS: Final = 128

DEFAULT_MAX_REQUEST_BYTES: Final = 1536 * 1024  # etcd's own default --max-request-bytes

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# Bytes kept free in every request below max_request_bytes, for what the estimate of a
# commit's size leaves out (the request header, the raft entry around it).
_REQUEST_MARGIN = 4096
# Bytes of protobuf framing counted per operation of a Txn (tags, lengths, the op wrapper).
_OP_OVERHEAD = 24
# Bytes of a stored version beyond its state: commit time, back pointer, token (msgpack).
_VERSION_OVERHEAD = 32
# Retry pacing once every endpoint failed in a row: from 25 ms, doubling, up to 250 ms.
_MIN_BACKOFF = 0.025
_MAX_BACKOFF = 0.25
# Failure reads kept free in every group for earlier attempts of unknown outcome.
_AMBIGUOUS_ROOM = 8
# Bounds of the URL options: the time budget of a call, the smallest request limit.
_MAX_TIMEOUT = 3600.0
_MIN_REQUEST = 64 * 1024
# Answers of _fits() remembered per driver, at most.
_FIT_MEMO = 4096
# Largest range read per round trip while scanning.
_MAX_CHUNK = 512
# The backwards search of since_latest with labels: its first window (in revisions), and
# the postings read per round trip inside a window.
_FIRST_WINDOW = 256
_BACKWARD_CHUNK = 64
# How long aclose() waits for gRPC's own tasks of the watch stream to finish.
_GRPC_SETTLE = 1.0
_CHANNEL_OPTIONS: Final = {
    # Reconnect quickly once a member is back: gRPC's default backoff grows to two minutes,
    # and calls on a channel waiting to reconnect fail at once.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 250,
    # Notice dead connections (a partitioned member) without waiting for TCP; etcd accepts
    # pings every 5 s or slower on connections with open streams.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    # A page's size is bounded by its limit and the states' sizes, not by a transport cap.
    "grpc.max_receive_message_length": -1,
}

#: The environment variable the password of ``etcd://user@host/prefix`` is read from.
PASSWORD_ENV: Final = "FLOWSTATE_ETCD_PASSWORD"
# URL options naming the PEM files of a TLS connection.
_FILE_OPTIONS: Final = ("ca", "cert", "key")
# URL query options and how each one is parsed.
_OPTIONS: Final[dict[str, Callable[[str, str, str], float | int]]] = {
    "timeout": _args.url_number,
    "max_txn_ops": _args.url_count,
    "max_request_bytes": _args.url_count,
}
_POS_LEN = 21  # b"%016x/%04x"


# -- stored records ----------------------------------------------------------------------------


class _StoredHead(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The value of ``~head``: the head commit's ``H`` and its time."""

    prev: int
    at_ms: int


class _StoredVersion(msgspec.Struct, array_like=True, gc=False):
    """The value of ``~s/<id>`` and ``~log/<H>/<n>``."""

    state: State
    back: int
    token: int


class _Posting(msgspec.Struct, array_like=True, gc=False):
    """The value of a history or label posting: enough to filter without reading the version."""

    id: str
    labels: dict[str, str]


class _LeaseHolder(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The value of ``~lease/<name>``."""

    holder: str
    ttl: float


class _Head(NamedTuple):
    """The head as the driver last saw it: its revision and its stored value."""

    rev: int
    prev: int
    at_ms: int


_NO_HEAD = _Head(0, 0, 0)


# -- keys --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _enc(part: str) -> bytes:
    """A key component with no ``/`` in it: percent-encoded UTF-8 (cached: every commit
    encodes its states' ids and labels again)."""
    return quote(part, safe="").encode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    """The end (exclusive) of the range of every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _pos(group: int, index: int) -> bytes:
    return b"%016x/%04x" % (group, index)


def _parse_pos(key: bytes) -> tuple[int, int]:
    """``(H, n)`` from a key that ends in ``<H>/<n>``."""
    return int(key[-_POS_LEN:-5], 16), int(key[-4:], 16)


class _Keys:
    """Builds the keys of one store (see the module docstring for the layout)."""

    def __init__(self, prefix: str) -> None:
        base = prefix.encode("utf-8") + b"/~"
        self.base = base
        self.meta = base + b"meta"
        self.head = base + b"head"
        self.latest_base = base + b"s/"
        self.log_base = base + b"log/"
        self.label_base = base + b"lbl/"
        self.history_base = base + b"id/"
        self.time_base = base + b"t/"
        self.data_base = base + b"d/"
        self.delay_base = base + b"dly/"
        self.lease_base = base + b"lease/"

    def latest(self, state_id: str) -> bytes:
        return self.latest_base + _enc(state_id)

    def log(self, group: int, index: int) -> bytes:
        return self.log_base + _pos(group, index)

    def log_group(self, group: int) -> bytes:
        return self.log_base + b"%016x/" % group

    def history(self, state_id: str) -> bytes:
        return self.history_base + _enc(state_id) + b"/"

    def postings(self, key: str, value: str) -> bytes:
        return self.label_base + _enc(key) + b"/" + _enc(value) + b"/"

    def time(self, at_ms: int, group: int) -> bytes:
        return self.time_base + b"%012x/%016x" % (at_ms, group)

    def data(self, state_id: str, alias: str) -> bytes:
        return self.data_base + _enc(state_id) + b"/" + _enc(alias) + b"/"

    def lease(self, name: str) -> bytes:
        return self.lease_base + _enc(name)


# -- requests ----------------------------------------------------------------------------------


def _range(
    key: bytes,
    end: bytes = b"",
    *,
    limit: int = 0,
    revision: int = 0,
    keys_only: bool = False,
    descending: bool = False,
    max_mod_revision: int = 0,
) -> Any:
    request = rpc.RangeRequest(
        key=key,
        range_end=end,
        limit=limit,
        revision=revision,
        keys_only=keys_only,
        max_mod_revision=max_mod_revision,
    )
    if descending:
        request.sort_order = rpc.RangeRequest.DESCEND
        request.sort_target = rpc.RangeRequest.KEY
    return request


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _get(request: Any) -> Any:
    return rpc.RequestOp(request_range=request)


def _mod_is(key: bytes, rev: int) -> Any:
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=rev)


_MOD: Final = rpc.Compare.MOD
_EQUAL: Final = rpc.Compare.EQUAL


def _absent(key: bytes) -> Any:
    return rpc.Compare(
        key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
    )


def _unpack(responses: Iterable[Any]) -> list[Any]:
    """The responses of a ``Txn`` in request order, with the driver's packing undone."""
    flat: list[Any] = []
    for response in responses:
        if response.WhichOneof("response") == "response_txn":
            flat += _unpack(response.response_txn.responses)
        else:
            flat.append(response)
    return flat


# -- errors ------------------------------------------------------------------------------------

_UNAVAILABLE_CODES = frozenset(
    {rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.CANCELLED}
)
#: What etcd 3.4 sends with code UNKNOWN when a request ran out of time (or was dropped)
#: inside the server, as while a restarted member catches up: the same call may succeed.
_UNKNOWN_BUT_TRANSIENT = ("context deadline exceeded", "context canceled")


class _CompactedError(DriverError):
    """A read pinned to a revision that etcd compacted meanwhile (the page is read again)."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, rpc.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    """True for failures that say nothing about the request itself: etcd (or the member)
    could not be reached or could not answer in time; the same call may succeed later."""
    if isinstance(exc, rpc.AioRpcError):
        code = exc.code()
        if code == rpc.StatusCode.RESOURCE_EXHAUSTED:
            # etcd's "too many requests" passes; "database space exceeded" needs an operator
            # and "message larger than max" never passes.
            return "too many requests" in (exc.details() or "")
        if code == rpc.StatusCode.UNKNOWN:
            return (exc.details() or "").startswith(_UNKNOWN_BUT_TRANSIENT)
        return code in _UNAVAILABLE_CODES
    return isinstance(
        exc,
        aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError | TimeoutError | OSError,
    )


def _too_large(exc: BaseException) -> bool:
    """True when etcd refused a request for its size (the request was not applied)."""
    if not isinstance(exc, rpc.AioRpcError):
        return False
    details = exc.details() or ""
    return "request is too large" in details or "larger than max" in details


def _tls_failed(details: str) -> bool:
    """True when a connection failed in its TLS handshake (a wrong CA, a client certificate
    the server refuses, TLS spoken to a plain-text server or the reverse): a retry would fail
    the same way."""
    lowered = details.lower()
    return any(
        marker in lowered
        for marker in ("handshake", "certificate", "ssl", "tls", "wrong version number")
    )


def _copy_error(error: FlowstateError) -> FlowstateError:
    """A fresh instance of a group-wide error for each waiting commit, so that raising it in
    several tasks does not pile their tracebacks onto one object.
    """
    try:
        clone = type(error)(*error.args)
    except TypeError:
        return error
    clone.__cause__ = error.__cause__
    return clone


def _settle(fut: asyncio.Future[T], value: T | None, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled; the outcome is dropped
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(cast("T", value))


def _decode(decoder: msgspec.msgpack.Decoder[D], kv: Any) -> D:
    """The value of ``kv``; a value flowstate did not write is a ``DriverError``."""
    try:
        return decoder.decode(kv.value)
    except msgspec.DecodeError as exc:
        key = bytes(kv.key)
        raise DriverError(f"etcd key {key!r} holds a value flowstate cannot read: {exc}") from exc


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _from_ms(ms: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(milliseconds=ms)


def _ceil_ms(moment: datetime.datetime) -> int:
    """The first whole millisecond at or after ``moment`` (stored times are whole ms)."""
    micros = (moment - _EPOCH) // datetime.timedelta(microseconds=1)
    return -(-micros // 1000)


def _grpc_call_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """The tasks gRPC started for a stream call since ``before`` was taken.

    gRPC runs a task per stream call that outlives the call's cancellation by a few loop
    iterations; the driver waits for it in ``aclose()`` so that no task outlives the driver.
    """
    found = set()
    for task in asyncio.all_tasks() - before:
        name = getattr(task.get_coro(), "__qualname__", "")
        if not task.done() and name.startswith(("_AioCall.", "StreamStreamCall.")):
            found.add(task)
    return found


# -- connections -------------------------------------------------------------------------------


class _TLSFiles(NamedTuple):
    """PEM files of a TLS connection: the CA to trust, and the client's own certificate."""

    ca: str | None
    cert: str | None
    key: str | None


def _read_tls(files: _TLSFiles) -> Any:
    """gRPC channel credentials from the PEM files (read on a worker thread)."""
    contents: dict[str, bytes | None] = {}
    for name, path in files._asdict().items():
        if path is None:
            contents[name] = None
            continue
        try:
            with open(path, "rb") as file:
                contents[name] = file.read()
        except OSError as exc:
            raise DriverError(f"cannot read the etcd TLS {name} file {path!r}: {exc}") from exc
    return grpc.ssl_channel_credentials(
        root_certificates=contents["ca"],
        private_key=contents["key"],
        certificate_chain=contents["cert"],
    )


class _Connection:
    """One gRPC channel to one member, the stubs the driver calls on it, and the auth token
    (``metadata``) when the driver authenticates with a user and password."""

    def __init__(self, target: str, credentials: Any, username: str | None) -> None:
        options = list(_CHANNEL_OPTIONS.items())
        if credentials is None:
            self.channel = rpc.insecure_channel(target, options=options)
        else:
            self.channel = rpc.secure_channel(target, credentials, options=options)
        self.kvstub = rpc.KVStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self._username = username
        self.metadata: tuple[tuple[str, str], ...] | None = None

    @property
    def needs_token(self) -> bool:
        return self._username is not None and self.metadata is None

    async def authenticate(self, password: str, seconds: float) -> None:
        """Get a token for the user (etcd's simple tokens expire, and die with a restart)."""
        request = rpc.AuthenticateRequest(name=self._username, password=password)
        response = await rpc.AuthStub(self.channel).Authenticate(request, timeout=seconds)
        self.metadata = (("token", response.token),)

    async def close(self) -> None:
        await self.channel.close()


# -- commits -----------------------------------------------------------------------------------


class _Write(NamedTuple):
    """One state write, with what does not depend on the attempt prepared in advance."""

    id: str
    expected_rev: int
    latest_key: bytes
    state: State
    posting: bytes
    posting_bases: list[bytes]
    data: list[tuple[bytes, bytes]]
    delay_to: str
    delay_at: datetime.datetime | None
    size: int  # bytes this write adds to a Txn, every key and value counted


class _Pending:
    """A commit waiting for (or in) a group."""

    __slots__ = ("deadline", "fut", "ids", "puts", "size", "writes")

    def __init__(
        self, writes: list[_Write], fut: asyncio.Future[CommitResult], deadline: float
    ) -> None:
        self.writes = writes
        self.ids = {w.id for w in writes}
        self.fut = fut
        self.deadline = deadline
        puts = size = 0
        for w in writes:
            puts += 2 + len(w.posting_bases) + len(w.data) + (w.delay_at is not None)
            size += w.size
        self.puts = puts
        self.size = size


def _plan(limit: int, compares: int, branches: Sequence[int]) -> int | None:
    """How many ops the top level of a ``Txn`` may hold so that it passes ``--max-txn-ops``.

    etcd counts a nested ``Txn`` against what its parent leaves: a nested ``Txn`` may hold
    ``limit`` minus the parent's largest list of compares or ops. A branch longer than the
    returned count goes into nested condition-less ``Txn`` ops of ``limit - count`` ops each.
    Returns None when no count fits.
    """
    widest = max(compares, *branches)
    if widest <= limit:
        return widest
    for count in range(max(compares, 1), limit):
        room = limit - count
        if all(n <= count or -(-n // room) <= count for n in branches):
            return count
    return None


def _branch(ops: Any, items: list[T], count: int, limit: int) -> list[tuple[Any, list[T]]]:
    """Where each item of one branch of a ``Txn`` planned by :func:`_plan` with ``count``
    goes: ``(ops, items)`` when they fit the branch's own list ``ops``, else one nested
    condition-less ``Txn`` op (added to ``ops`` here) per ``limit - count`` items, with the
    items whose ops go into its ``success`` list."""
    if len(items) <= count:
        return [(ops, items)]
    room = limit - count
    return [
        (ops.add().request_txn.success, items[i : i + room]) for i in range(0, len(items), room)
    ]


# -- scanning ----------------------------------------------------------------------------------


class _Entry:
    """One key found by a scan, with its position ``(H, n)`` and revision."""

    __slots__ = ("kv", "pos", "rev", "state")

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.pos = _parse_pos(kv.key)
        self.rev: int = kv.mod_revision
        self.state: State | None = None


class _Scanner:
    """Reads one key range forwards in chunks.

    ``wanted`` says the range holds postings, and which of them match: those whose labels
    satisfy any of its AND-maps (every posting when it is empty). None: a range of versions.
    """

    __slots__ = ("buffer", "chunk", "done", "end", "next_key", "wanted")

    def __init__(
        self, start: bytes, end: bytes, chunk: int, wanted: list[dict[str, str]] | None
    ) -> None:
        self.next_key = start
        self.end = end
        self.chunk = chunk
        self.wanted = wanted
        self.buffer: deque[_Entry] = deque()
        self.done = False

    def request(self, snapshot: int = 0) -> Any:
        """The range request for the next chunk."""
        return _range(self.next_key, self.end, limit=self.chunk, revision=snapshot)

    def feed(self, response: Any) -> None:
        """Take the answer to :meth:`request`."""
        kvs = response.kvs
        self.buffer.extend(_Entry(kv) for kv in kvs)
        if response.more and kvs:
            self.next_key = bytes(kvs[-1].key) + b"\0"
            self.chunk = min(self.chunk * 2, _MAX_CHUNK)
        else:
            self.done = True


class EtcdDriver(Driver):
    """Stores states in an etcd cluster under a key prefix.

    Args:
        endpoints: ``"host:port"`` of each cluster member (a string holds one or several,
            comma-separated); the driver fails over between them.
        prefix: The key prefix of the store (see the module docstring).
        timeout: The time budget of one call in seconds, retries and fail-over included.
        max_txn_ops: The server's ``--max-txn-ops``.
        max_request_bytes: The server's ``--max-request-bytes``.
        username: Authenticate as this user (with ``password``).
        password: The user's password; shown nowhere.
        ca: PEM file of the CA that signed the server's certificate: connect over TLS.
        cert: PEM file of a client certificate (with ``key``), for ``--client-cert-auth``.
        key: PEM file of the client certificate's private key.
        create: Make the prefix a store when it is not one yet (the default); when False,
            ``open()`` fails on a prefix that holds no store instead (readers such as
            ``flowstate states`` never create a store).

    Raises:
        InvalidURLError: An endpoint, the prefix or an option is invalid.

    Use it from the event loop that opened it. See the module docstring for the key layout,
    revisions, failures and watching.
    """

    scheme = "etcd"

    def __init__(
        self,
        endpoints: str | Sequence[str] = f"127.0.0.1:{DEFAULT_PORT}",
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        username: str | None = None,
        password: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        create: bool = True,
    ) -> None:
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        if not items:
            raise InvalidURLError("the etcd driver needs at least one endpoint")
        self.endpoints: list[tuple[str, int]] = [_parse_endpoint(item) for item in items]
        self.prefix = _check_prefix(prefix)
        if not is_number(timeout, strict=True) or timeout > _MAX_TIMEOUT:
            raise InvalidURLError(
                f"timeout must be a number of seconds above 0 and at most {_MAX_TIMEOUT:g}, "
                f"not {describe(timeout)}"
            )
        if not is_int(max_txn_ops) or not 3 <= max_txn_ops <= 0xFFFF:
            raise InvalidURLError(
                f"max_txn_ops must be between 3 and 65535, not {describe(max_txn_ops)}"
            )
        if not is_int(max_request_bytes) or not _MIN_REQUEST <= max_request_bytes <= 2**31 - 1:
            raise InvalidURLError(
                f"max_request_bytes must be between {_MIN_REQUEST} and {2**31 - 1}, "
                f"not {describe(max_request_bytes)}"
            )
        if (username is None) != (password is None):
            raise InvalidURLError(
                f"a user needs a password and a password a user; set {PASSWORD_ENV} for "
                "etcd://user@host:port/prefix"
            )
        if username is not None and (not username or not is_text(username)):
            raise InvalidURLError(f"the etcd user name must be non-empty text, not {username!r}")
        if password is not None and not is_text(password):
            raise InvalidURLError("the etcd password must be text")
        if (cert is None) != (key is None):
            raise InvalidURLError("a client certificate (cert) needs its key (key), and back")
        for name, path in (("ca", ca), ("cert", cert), ("key", key)):
            if path is not None and (not path or not is_text(path) or "\0" in path):
                raise InvalidURLError(f"{name} must be the path of a PEM file, not {path!r}")
        self.timeout = float(timeout)
        self.max_txn_ops = int(max_txn_ops)
        self.max_request_bytes = int(max_request_bytes)
        self.username = username
        self.create = create
        self._password = password  # never shown: not in url, repr, logs or errors
        self._tls = None if ca is None and cert is None else _TLSFiles(ca, cert, key)
        self._keys = _Keys(self.prefix)
        # What one group may write: the limit, less the margin and the group's own keys
        # (the head, the time key, and the reads that settle attempts of unknown outcome).
        fixed = 4 * (len(self._keys.head) + 64) + _AMBIGUOUS_ROOM * (
            len(self._keys.log_base) + _POS_LEN + _OP_OVERHEAD
        )
        self._group_bytes = self.max_request_bytes - _REQUEST_MARGIN - fixed
        self._lifecycle = Lifecycle.UNOPENED
        self._open_lock = asyncio.Lock()
        self._clients: list[Any] = []
        self._current = 0
        self._head = _NO_HEAD
        self._watch_from = 1
        self._waiters = RevisionWaiters()
        self._queue: deque[_Pending] = deque()
        self._fit: dict[tuple[int, int], bool] = {}  # _fits(states, puts), remembered
        self._wakeup = asyncio.Event()
        self._sending = asyncio.Lock()
        self._solo = True
        self._closing = False
        self._task_group: asyncio.TaskGroup | None = None
        self._committer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._watch_ready = asyncio.Event()
        self._watch_wanted = asyncio.Event()
        self._watch_tasks: set[asyncio.Task[Any]] = set()
        self._watch_call: Any = None
        self._watch_busy = False
        self._stopping = False  # set by _shutdown(): the watch loop must not reconnect
        self._encoder = msgspec.msgpack.Encoder()
        self._head_decoder = msgspec.msgpack.Decoder(_StoredHead)
        self._version_decoder = msgspec.msgpack.Decoder(_StoredVersion)
        self._posting_decoder = msgspec.msgpack.Decoder(_Posting)
        self._delay_decoder = msgspec.msgpack.Decoder(DelayedState)
        self._lease_decoder = msgspec.msgpack.Decoder(_LeaseHolder)

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Create an unopened driver from an ``etcd://`` URL (see the module docstring).

        Raises:
            InvalidURLError: The URL is not a valid etcd driver URL.
        """
        shown = _redact(url)
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != cls.scheme:
            raise InvalidURLError(f"{shown!r} is not an etcd:// URL")
        if "#" in rest:
            raise InvalidURLError(f"{shown!r}: an etcd URL has no fragment")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        options: dict[str, Any] = {}
        userinfo, at, netloc = netloc.rpartition("@")
        if at:
            if ":" in userinfo:
                raise InvalidURLError(
                    f"{shown!r}: a password never goes in the URL; write etcd://user@host/prefix "
                    f"and set {PASSWORD_ENV}"
                )
            password = os.environ.get(PASSWORD_ENV)
            if password is None:
                raise InvalidURLError(
                    f"{shown!r}: user {unquote(userinfo)!r} needs a password: set {PASSWORD_ENV}"
                )
            options["username"], options["password"] = unquote(userinfo), password
        if not netloc:
            raise InvalidURLError(f"{shown!r}: expected etcd://host:port[,host:port...]/key-prefix")
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise InvalidURLError(f"{shown!r}: malformed query string ({exc})") from None
        for key, value in pairs:
            if key in _FILE_OPTIONS:
                options[key] = value
                continue
            parse = _OPTIONS.get(key)
            if parse is None:
                known = ", ".join([*_OPTIONS, *_FILE_OPTIONS])
                raise InvalidURLError(f"{shown!r}: unknown option {key!r}; known options: {known}")
            options[key] = parse(shown, key, value)
        prefix = unquote(path).removesuffix("/")
        try:
            return cls(netloc.split(","), prefix or DEFAULT_PREFIX, **options)
        except InvalidURLError as exc:
            raise InvalidURLError(f"{shown!r}: {exc}") from None

    @property
    def url(self) -> str:
        """The driver's URL, in canonical form."""
        hosts = ",".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.endpoints
        )
        user = f"{quote(self.username, safe='')}@" if self.username is not None else ""
        tls = self._tls
        options = "&".join(
            f"{name}={quote(path, safe='/')}"
            for name, path in (tls._asdict().items() if tls is not None else ())
            if path is not None
        )
        query = f"?{options}" if options else ""
        return f"etcd://{user}{hosts}/{quote(self.prefix, safe='/')}{query}"

    def __repr__(self) -> str:
        return f"EtcdDriver({self.url!r}, {self._lifecycle.name.lower()})"

    def __del__(self) -> None:
        if getattr(self, "_lifecycle", None) is not Lifecycle.OPENED:
            return
        warn_unclosed(self)

    # -- lifecycle -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._lifecycle is not Lifecycle.OPENED:
            raise not_open(self._lifecycle, "the etcd driver")

    async def open(self) -> None:
        """Connect, check the store's layout version and open the watch stream.

        Raises:
            ClosedError: The driver was closed.
            SchemaVersionError: The store was written by a newer flowstate.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise, or the prefix holds something else.
        """
        async with self._open_lock:
            if self._lifecycle is Lifecycle.CLOSED:
                raise ClosedError("the etcd driver is closed and cannot be reopened")
            if self._lifecycle is Lifecycle.OPENED:
                return
            deadline = self._deadline()
            self._watch_ready.clear()
            self._stopping = False
            try:
                credentials = None
                if self._tls is not None:
                    credentials = await asyncio.to_thread(_read_tls, self._tls)
                self._clients = [
                    _Connection(
                        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                        credentials,
                        self.username,
                    )
                    for host, port in self.endpoints
                ]
                header_rev, head = await self._bootstrap(deadline)
                self._head = head
                self._watch_from = header_rev + 1
                task_group = asyncio.TaskGroup()
                await task_group.__aenter__()
                self._task_group = task_group
                self._committer = task_group.create_task(self._run_committer())
                self._watcher = task_group.create_task(self._run_watch())
                try:
                    async with asyncio.timeout(max(0.0, deadline - self._now())):
                        await self._watch_ready.wait()
                except TimeoutError:
                    raise DriverUnavailableError(
                        f"etcd at {self.url} did not accept a watch within {self.timeout}s"
                    ) from None
            except BaseException:
                await self._shutdown()
                raise
            self._lifecycle = Lifecycle.OPENED

    async def _bootstrap(self, deadline: float) -> tuple[int, _Head]:
        """Write or check ``~meta``; return the etcd revision read at and the head."""
        keys = self._keys
        version = str(LAYOUT_VERSION).encode()
        created = [_put(keys.meta, version)] if self.create else []
        request = rpc.TxnRequest(
            compare=[_absent(keys.meta)],
            success=[*created, _get(_range(keys.head))],
            failure=[_get(_range(keys.meta)), _get(_range(keys.head))],
        )
        response = await self._txn(request, "open", deadline)
        responses = list(response.responses)
        if response.succeeded and not self.create:
            raise DriverError(f"no flowstate store under the prefix of {self.url}")
        if not response.succeeded:
            raw = bytes(responses[0].response_range.kvs[0].value)
            try:
                found = int(raw)
            except ValueError:
                raise DriverError(
                    f"{self.url}: {keys.meta!r} holds {raw!r}; the prefix is not a flowstate store"
                ) from None
            if found > LAYOUT_VERSION:
                raise SchemaVersionError(
                    f"{self.url} was written by a newer flowstate (layout version {found}; "
                    f"this flowstate reads up to version {LAYOUT_VERSION}): upgrade flowstate "
                    "to open it"
                )
            if found < LAYOUT_VERSION:
                # Layout 1 had no per-state history keys, and etcd cannot add them later
                # under the revisions of the versions they index.
                raise SchemaVersionError(
                    f"{self.url} was written by flowstate 0.1 (layout version {found}), which "
                    f"this flowstate cannot read (it needs layout version {LAYOUT_VERSION}); "
                    "export its states and commit them into a new prefix"
                )
        head = self._parse_head(responses[1].response_range)
        return int(response.header.revision), head

    async def aclose(self) -> None:
        """Write the commits already accepted, stop watching and close the connections.

        Calling it again does nothing. Waiters in :meth:`wait_for_rev` get ``ClosedError``.
        """
        if self._lifecycle is Lifecycle.CLOSED:
            return
        self._lifecycle = Lifecycle.CLOSED
        self._waiters.close(ClosedError("the etcd driver was closed"))
        try:
            committer = self._committer
            if committer is not None and not committer.done():
                self._closing = True
                self._wakeup.set()
                # The accepted commits are written; each one is bounded by its own deadline.
                await asyncio.wait({committer}, timeout=self.timeout + 1)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Cancel the background tasks and close every channel."""
        self._stopping = True
        watcher, call = self._watcher, self._watch_call
        if watcher is not None and call is not None and self._watch_busy:
            # Cancelling the call ends the stream operation in flight here, on this loop;
            # cancelling the task alone would leave gRPC to complete it later, maybe after
            # the loop is gone.
            call.cancel()
            await asyncio.wait({watcher}, timeout=_GRPC_SETTLE)
        for task in (self._committer, watcher):
            if task is not None:
                task.cancel()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            await task_group.__aexit__(None, None, None)
        self._committer = self._watcher = None
        for pending in self._queue:
            _settle(pending.fut, None, ClosedError("the etcd driver was closed"))
        self._queue.clear()
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        tasks, self._watch_tasks = self._watch_tasks, set()
        pending_tasks = {task for task in tasks if not task.done()}
        if pending_tasks:
            await asyncio.wait(pending_tasks, timeout=_GRPC_SETTLE)

    # -- calls, errors and fail-over -------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _deadline(self) -> float:
        return self._now() + self.timeout

    def _failure(self, what: str, exc: BaseException) -> FlowstateError | None:
        """The error to raise for ``exc``, or None when the call may be retried."""
        if not self._clients:
            return ClosedError("the etcd driver was closed")
        if isinstance(exc, rpc.AioRpcError):
            code, details = exc.code(), exc.details() or ""
            if code == rpc.StatusCode.OUT_OF_RANGE:
                return _CompactedError(f"etcd {what}: {_describe(exc)}")
            if "authentication failed" in details:
                return DriverError(
                    f"etcd at {self.url} refused user {self.username!r}: {details} (the "
                    f"password comes from {PASSWORD_ENV})"
                )
            if self.username is not None and (
                code == rpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in details
            ):
                # etcd forgets its tokens when it restarts, and they expire: get new ones.
                for client in self._clients:
                    client.metadata = None
                return None
            if _tls_failed(details):
                return DriverError(
                    f"no TLS connection to etcd at {self.url}: {details} (check the ca, cert "
                    "and key options, and whether the server speaks TLS)"
                )
        if _retryable(exc):
            return None
        return DriverError(f"etcd {what} failed: {_describe(exc)}")

    def _unavailable(self, what: str, exc: BaseException) -> DriverUnavailableError:
        return DriverUnavailableError(
            f"etcd at {self.url} is unavailable ({what}, {self.timeout}s): {_describe(exc)}"
        )

    def _rotate(self, failed: int) -> None:
        """Move to the next endpoint after a failure on endpoint ``failed``."""
        if self._current == failed and self._clients:
            self._current = (failed + 1) % len(self._clients)
            if len(self._clients) > 1:
                host, port = self.endpoints[failed]
                logger.info("etcd endpoint %s:%d failed; trying the next one", host, port)

    async def _pause(self, attempt: int, deadline: float) -> None:
        """Pace retries: try every endpoint once at once, then back off (bounded)."""
        endpoints = len(self.endpoints)
        if attempt < endpoints:
            return
        delay = min(_MAX_BACKOFF, _MIN_BACKOFF * 2 ** (attempt - endpoints))
        delay = min(delay, deadline - self._now())
        if delay > 0:
            await asyncio.sleep(delay)

    async def _call(
        self, what: str, fn: Callable[[Any, float], Awaitable[T]], deadline: float
    ) -> T:
        """Run ``fn(client, seconds_left)``, retrying on the next endpoint when etcd is
        unavailable, until ``deadline``."""
        attempt = 0
        while True:
            index = self._current
            if not self._clients:  # closed (or never opened) while the call was retrying
                raise ClosedError("the etcd driver is closed")
            client = self._clients[index]
            try:
                await self._authenticate(client, deadline)
                return await fn(client, max(0.001, deadline - self._now()))
            except FlowstateError:
                raise
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._lifecycle is Lifecycle.CLOSED and task and not task.cancelling():
                    # gRPC ends the calls of a channel that closes with CancelledError; this
                    # caller was not cancelled: the driver was closed under it.
                    raise ClosedError("the etcd driver was closed") from None
                raise
            except Exception as exc:
                error = self._failure(what, exc)
                if error is None and what == "open" and await self._speaks_tls(index, exc):
                    error = DriverError(
                        f"no TLS connection to etcd at {self.url}: the server speaks TLS and "
                        "this URL asks for plain text; give it ?ca=/path/ca.pem (and cert= and "
                        "key= when the server wants client certificates)"
                    )
                if error is not None:
                    raise error from exc
                if self._now() >= deadline:
                    raise self._unavailable(what, exc) from exc
                self._rotate(index)
                attempt += 1
                await self._pause(attempt, deadline)

    async def _speaks_tls(self, index: int, exc: BaseException) -> bool:
        """After a plain-text connection was closed at once: does the member speak TLS?

        A TLS server drops a plain-text client without a word, which looks like a member
        going down; one TLS handshake tells the two apart, so that the mistake fails fast.
        """
        if self._tls is not None or not isinstance(exc, rpc.AioRpcError):
            return False
        if "socket closed" not in (exc.details() or "").lower():
            return False
        host, port = self.endpoints[index]
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a probe: nothing is sent but the handshake
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(host, port, ssl=context)
        except ssl.SSLError as probe:
            # The server answered in TLS, even if only to refuse (e.g. no client certificate).
            return "wrong version number" not in str(probe).lower()
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return True

    async def _authenticate(self, client: _Connection, deadline: float) -> None:
        """Get the connection a token first, when the driver has a user and has none yet."""
        if client.needs_token:
            assert self._password is not None  # a user always comes with a password
            await client.authenticate(self._password, max(0.001, deadline - self._now()))

    async def _txn(self, request: Any, what: str, deadline: float) -> Any:
        async def call(client: Any, seconds: float) -> Any:
            return await client.kvstub.Txn(request, timeout=seconds, metadata=client.metadata)

        return await self._call(what, call, deadline)

    async def _read(self, requests: list[Any], deadline: float) -> tuple[int, list[Any]]:
        """Read several ranges at one revision; return it and the range responses."""
        if len(requests) == 1:
            request = requests[0]

            async def one(client: Any, seconds: float) -> Any:
                return await client.kvstub.Range(request, timeout=seconds, metadata=client.metadata)

            response = await self._call("read", one, deadline)
            return int(response.header.revision), [response]
        limit = self.max_txn_ops
        count = _plan(limit, 0, [len(requests)])
        if count is None:
            raise DriverError(f"one read of {len(requests)} ranges exceeds max_txn_ops={limit}")
        txn = rpc.TxnRequest()
        for ops, part in _branch(txn.success, requests, count, limit):
            add = ops.add
            for wanted in part:
                add().request_range.CopyFrom(wanted)
        response = await self._txn(txn, "read", deadline)
        ranges = [r.response_range for r in _unpack(response.responses)]
        return int(response.header.revision), ranges

    # -- head and waiting ------------------------------------------------------------------

    def _parse_head(self, response: Any) -> _Head:
        kvs = response.kvs
        if not kvs:
            return _NO_HEAD
        kv = kvs[0]
        stored = _decode(self._head_decoder, kv)
        return _Head(int(kv.mod_revision), stored.prev, stored.at_ms)

    def _note_head(self, head: _Head) -> None:
        """Note that revisions up to ``head.rev`` are committed; wake who waited for them."""
        if head.rev <= self._head.rev:
            return
        self._head = head
        self._waiters.advance(head.rev)

    async def head_rev(self) -> int:
        """Return the store's latest revision (0 for an empty store).

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        self._check()
        _, (response,) = await self._read([_range(self._keys.head)], self._deadline())
        head = self._parse_head(response)
        self._note_head(head)
        return head.rev

    async def wait_for_rev(self, rev: int) -> None:
        """Return once the store's latest revision is at least ``rev``.

        Commits through this driver wake waiters at once; the driver's watch on the head
        key (created by the first wait) wakes them for commits made elsewhere, as soon as
        etcd delivers the event.

        Raises:
            ClosedError: The driver is not open, or was closed while waiting.
        """
        _args.check_wait(rev)
        self._check()
        if self._head.rev >= rev:
            return
        self._watch_wanted.set()  # from now on the driver watches the head key
        await self._waiters.wait(rev)

    async def _run_watch(self) -> None:
        """Keep the watch stream open until the driver closes; reopen it when it breaks."""
        attempt = 0
        while not self._stopped():
            index = self._current
            client = self._clients[index]
            call = None
            try:
                await self._authenticate(client, self._deadline())
                before = asyncio.all_tasks()
                call = self._watch_call = rpc.WatchStub(client.channel).Watch(
                    metadata=client.metadata
                )
                if await self._watch_stream(call, before):
                    attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; the stream is opened again
                if self._stopped():
                    return
                # Classified as calls are (which also drops tokens etcd no longer knows).
                error = exc if isinstance(exc, FlowstateError) else self._failure("watch", exc)
                if error is not None:
                    logger.warning("etcd watch on %s failed: %s", self.url, _describe(error))
                else:
                    logger.debug("etcd watch on %s broke: %s", self.url, _describe(exc))
                self._rotate(index)
            finally:
                if call is not None:
                    call.cancel()
                self._watch_call = None
            attempt += 1
            if attempt > len(self.endpoints):
                await asyncio.sleep(min(_MAX_BACKOFF, _MIN_BACKOFF * 2**attempt))

    async def _watch_stream(self, call: Any, before: set[asyncio.Task[Any]]) -> bool:
        """Serve one watch stream until it ends; True when it got as far as watching.

        The stream opens with a progress request, which watches nothing: the watch on the
        head key is created once somebody waits, so that a driver that only commits is not
        sent an event for each of its own commits.
        """
        progress = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
        await self._stream_io(call.write(progress))
        if not isinstance(await self._stream_io(call.read()), rpc.WatchResponse):
            return False  # the server ended the stream
        self._watch_tasks = _grpc_call_tasks(before)
        self._watch_ready.set()
        await self._watch_wanted.wait()
        start = max(self._watch_from, self._head.rev + 1)
        create = rpc.WatchCreateRequest(key=self._keys.head, start_revision=start)
        await self._stream_io(call.write(rpc.WatchRequest(create_request=create)))
        watching = False
        while True:
            response = await self._stream_io(call.read())
            if not isinstance(response, rpc.WatchResponse):
                return watching
            watching = watching or response.created
            if response.compact_revision:
                await self._after_compaction(response.compact_revision)
                return watching
            if response.canceled:
                return watching
            self._watched(response.events)

    def _stopped(self) -> bool:
        """True once the driver shuts down (a call, so that it is read afresh each time)."""
        return self._stopping

    async def _stream_io(self, operation: Awaitable[T]) -> T:
        """Await an operation on the watch stream, noting that one is in flight."""
        self._watch_busy = True
        try:
            return await operation
        finally:
            self._watch_busy = False

    def _watched(self, events: Iterable[Any]) -> None:
        for event in events:
            kv = event.kv
            rev = int(kv.mod_revision)
            self._watch_from = max(self._watch_from, rev + 1)
            if event.type == rpc.Event.PUT:
                stored = _decode(self._head_decoder, kv)
                self._note_head(_Head(rev, stored.prev, stored.at_ms))

    async def _after_compaction(self, compacted: int) -> None:
        """The watch's start revision was compacted: read the head again, watch from there."""
        logger.info("etcd compacted revision %d under the watch of %s", compacted, self.url)
        header_rev, (response,) = await self._read([_range(self._keys.head)], self._deadline())
        self._note_head(self._parse_head(response))
        self._watch_from = max(self._watch_from, header_rev + 1)

    # -- commits ---------------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> CommitResult:
        """Write every state of ``request`` in one etcd ``Txn``, if every ``expected_rev``
        matches. The states share one revision.

        Concurrent commits are sent together (group commit); each one still succeeds or
        conflicts on its own.

        Raises:
            ConflictError: Some state's latest revision differed from ``expected_rev``; it
                lists every such state, and nothing was written.
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``. The commit
                may or may not have been applied; a retry with the same expected revisions
                is safe (it conflicts if the first attempt was applied).
            DriverError: etcd refused the commit (too large, no space left, ...).
        """
        self._check()
        writes = request.writes
        if not writes:
            return CommitResult(revs=[], committed_at=_from_ms(max(_now_ms(), self._head.at_ms)))
        prepared = [self._prepare(write) for write in writes]
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(prepared, fut, self._deadline())
        if not self._fits(len(prepared), pending.puts):
            raise DriverError(
                f"a commit of {len(writes)} states writing {pending.puts} keys does not fit one "
                f"etcd transaction (max_txn_ops={self.max_txn_ops})"
            )
        if pending.size > self._group_bytes:
            # Refused alone, before anything is sent: retrying cannot help, and commits
            # made at the same time are not held up by it.
            raise DriverError(
                f"a commit of {len(writes)} states writes about {pending.size} bytes, over "
                f"etcd's request limit of {self.max_request_bytes} bytes (less "
                f"{self.max_request_bytes - self._group_bytes} bytes for the transaction "
                "itself); store large payloads elsewhere, or raise the server's "
                "--max-request-bytes and the URL's max_request_bytes together"
            )
        if not self._solo or self._queue or self._sending.locked():
            self._queue.append(pending)
            self._wakeup.set()
            return await fut
        # Nothing in flight and no concurrent load (the last group was one commit): send it
        # from this task, sparing the hop through the commit loop. Commits made meanwhile
        # queue up, and the commit loop sends them as one group.
        try:
            async with self._sending:
                await self._write_group([pending])
        finally:
            if self._queue:
                self._wakeup.set()
        return await fut

    def _prepare(self, write: StateWrite) -> _Write:
        state = write.state
        keys = self._keys
        labels = state.labels
        posting = self._encoder.encode(_Posting(id=state.id, labels=labels))
        data = []
        if write.data:
            data = [(keys.data(state.id, alias), bytes(blob)) for alias, blob in write.data.items()]
        # Everything the write adds to a Txn: the version twice (~s and ~log), its compare and
        # its failure read, each label posting, each data blob and the delay (which holds the
        # version once more), keys included.
        sample = msgspec.structs.replace(state, rev=0, committed_at=_EPOCH)
        version = len(self._encoder.encode(_StoredVersion(state=sample, back=0, token=0)))
        version += _VERSION_OVERHEAD
        latest_key = keys.latest(state.id)
        log_key = len(keys.log_base) + _POS_LEN
        size = 4 * (len(latest_key) + _OP_OVERHEAD) + 2 * version + log_key
        posting_bases = [keys.history(state.id)]
        for k, v in labels.items():
            posting_bases.append(keys.postings(k, v))
        per_posting = _POS_LEN + len(posting) + _OP_OVERHEAD
        for base in posting_bases:
            size += len(base) + per_posting
        for data_key, blob in data:
            size += len(data_key) + 16 + len(blob) + _OP_OVERHEAD
        delay_at = write.delay_at
        if delay_at is not None:
            size += len(keys.delay_base) + _POS_LEN + version + len(write.delay_to) + 32
        # Positional: _Write(id, expected_rev, latest_key, state, posting, posting_bases,
        # data, delay_to, delay_at, size).
        return _Write(
            state.id,
            write.expected_rev,
            latest_key,
            state,
            posting,
            posting_bases,
            data,
            write.delay_to,
            delay_at,
            size,
        )

    async def _run_committer(self) -> None:
        """Send queued commits, one group per ``Txn``, until the driver closes."""
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        async with self._sending:  # a commit its caller is sending finishes
                            if not self._queue:
                                return
                        continue
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                async with self._sending:  # one group in flight at a time
                    group = self._take_group()
                    if group:
                        await self._write_group(group)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail the waiting commits rather than hang them
            logger.exception("the etcd commit loop of %s failed", self.url)
            for pending in self._queue:
                _settle(pending.fut, None, DriverError(f"the etcd commit loop failed: {exc!r}"))
            self._queue.clear()

    def _take_group(self) -> list[_Pending]:
        """The next group: queued commits in order, skipping any that touches a state of the
        group already, up to the transaction's limits."""
        group: list[_Pending] = []
        ids: set[str] = set()
        states = puts = size = 0
        rest: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.fut.done():
                continue  # cancelled before it was sent: never written
            if group and (
                not ids.isdisjoint(pending.ids)
                or size + pending.size > self._group_bytes
                or not self._fits(states + len(pending.writes), puts + pending.puts)
            ):
                rest.append(pending)
                continue
            group.append(pending)
            ids |= pending.ids
            states += len(pending.writes)
            puts += pending.puts
            size += pending.size
        self._queue = rest
        return group

    def _fits(self, states: int, puts: int) -> bool:
        """True when a group of ``states`` writing ``puts`` keys fits one ``Txn``, with room
        for the reads that settle earlier attempts of unknown outcome (remembered: every
        commit asks, twice, and the answers repeat)."""
        known = self._fit.get((states, puts))
        if known is None:
            branches = (2 + puts, 1 + states + _AMBIGUOUS_ROOM)
            known = _plan(self.max_txn_ops, 1 + states, branches) is not None
            if len(self._fit) < _FIT_MEMO:
                self._fit[states, puts] = known
        return known

    def _group_txn(
        self,
        group: list[_Pending],
        head: _Head,
        at_ms: int,
        committed_at: datetime.datetime,
        token: int,
        ambiguous: list[int],
    ) -> Any:
        """The ``Txn`` of one attempt at a group, or None when it does not fit.

        The ops are written into the request in place (``add()``): building each op as its
        own message and handing the lists over copies every op once per level of nesting,
        which made building the request cost more than sending it.
        """
        keys = self._keys
        encode = self._encoder.encode
        base = head.rev
        back = head.prev
        log_base = keys.log_base
        delay_base = keys.delay_base
        guards: list[tuple[bytes, int]] = [(keys.head, base)]
        puts: list[tuple[bytes, bytes]] = [
            (keys.head, encode(_StoredHead(prev=base, at_ms=at_ms))),
            (keys.time(at_ms, base), b""),
        ]
        index = 0
        for pending in group:
            for w in pending.writes:
                guards.append((w.latest_key, w.expected_rev))
                stored = msgspec.structs.replace(w.state, rev=0, committed_at=committed_at)
                blob = encode(_StoredVersion(state=stored, back=back, token=token))
                pos = _pos(base, index)
                puts.append((w.latest_key, blob))
                puts.append((log_base + pos, blob))
                posting = w.posting
                for posting_base in w.posting_bases:
                    puts.append((posting_base + pos, posting))
                for data_base, data in w.data:
                    puts.append((data_base + b"%016x" % base, data))
                if w.delay_at is not None:
                    delayed = DelayedState(state=stored, to=w.delay_to, at=w.delay_at)
                    puts.append((delay_base + pos, encode(delayed)))
                index += 1
        # The failure branch reads the head, each guarded key (keys only), and the first
        # key of each earlier attempt of unknown outcome.
        ranges: list[tuple[bytes, bool]] = [(keys.head, False)]
        ranges += [(key, True) for key, _ in guards[1:]]
        ranges += [(keys.log(group_base, 0), False) for group_base in ambiguous]
        limit = self.max_txn_ops
        count = _plan(limit, len(guards), (len(puts), len(ranges)))
        if count is None:
            return None
        request = rpc.TxnRequest()
        compare_add = request.compare.add
        for key, rev in guards:
            compare = compare_add()
            compare.key = key
            compare.target = _MOD
            compare.result = _EQUAL
            compare.mod_revision = rev
        for ops, part in _branch(request.success, puts, count, limit):
            add = ops.add
            for key, value in part:
                put = add().request_put
                put.key = key
                put.value = value
        for ops, reads in _branch(request.failure, ranges, count, limit):
            add = ops.add
            for key, keys_only in reads:
                read = add().request_range
                read.key = key
                if keys_only:
                    read.keys_only = True
        return request

    async def _write_group(self, group: list[_Pending]) -> None:
        """Commit a group; settle every commit of it. Never raises (but CancelledError)."""
        # Under concurrent load, commits go through the commit loop, which groups them.
        self._solo = len(group) == 1
        token = secrets.randbits(63)
        ambiguous: list[int] = []  # the H of each attempt whose outcome is unknown
        deadline = min(p.deadline for p in group)
        attempt = 0
        last_error: BaseException | None = None
        while group:
            if self._now() >= deadline and attempt:
                error: FlowstateError = (
                    self._unavailable("commit", last_error)
                    if last_error is not None
                    else DriverUnavailableError(
                        f"the etcd store at {self.url} stayed too busy to commit within "
                        f"{self.timeout}s"
                    )
                )
                error.__cause__ = last_error
                self._fail(group, error)
                return
            head = self._head
            at_ms = max(_now_ms(), head.at_ms)
            committed_at = _from_ms(at_ms)
            request = self._group_txn(group, head, at_ms, committed_at, token, ambiguous)
            if request is None:  # only ever after many attempts of unknown outcome
                self._fail(
                    group,
                    DriverUnavailableError(
                        f"etcd at {self.url} kept failing to answer commits; their outcome is unknown"
                    ),
                )
                return
            index = self._current
            attempt += 1
            try:
                client = self._clients[index]
                await self._authenticate(client, deadline)
                response = await client.kvstub.Txn(
                    request,
                    timeout=max(0.001, deadline - self._now()),
                    metadata=client.metadata,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated and handed to the callers
                failure = self._failure("commit", exc)
                if failure is not None and _too_large(exc):
                    if len(group) > 1 and not ambiguous:
                        # The server's limit is below max_request_bytes: nothing was written,
                        # so each half goes on its own and an oversized commit fails alone.
                        half = len(group) // 2
                        await self._write_group(group[:half])
                        await self._write_group(group[half:])
                        return
                    failure = DriverError(
                        f"etcd refused a commit as too large ({_describe(exc)}); the server's "
                        f"--max-request-bytes is below max_request_bytes="
                        f"{self.max_request_bytes}: set the URL option to match it"
                    )
                if failure is not None:
                    failure.__cause__ = exc
                    self._fail(group, failure)
                    return
                # The Txn may or may not have been applied; its token will tell.
                last_error = exc
                if head.rev not in ambiguous:
                    ambiguous.append(head.rev)
                self._rotate(index)
                await self._pause(attempt, deadline)
                continue
            if response.succeeded:
                rev = int(response.header.revision)
                self._note_head(_Head(rev, head.rev, at_ms))
                self._succeed(group, rev, committed_at)
                return
            group = self._after_failed_compare(group, response, token, ambiguous)

    def _after_failed_compare(
        self, group: list[_Pending], response: Any, token: int, ambiguous: list[int]
    ) -> list[_Pending]:
        """Settle what a failed compare decides; return the commits to send again."""
        reads = [r.response_range for r in _unpack(response.responses)]
        self._note_head(self._parse_head(reads[0]))
        position = 1
        actual: list[list[int]] = []
        for pending in group:
            revs = []
            for _ in pending.writes:
                kvs = reads[position].kvs
                revs.append(int(kvs[0].mod_revision) if kvs else 0)
                position += 1
            actual.append(revs)
        for group_base, read in zip(list(ambiguous), reads[position:], strict=True):
            if not read.kvs:
                continue  # that attempt may still be in flight: the head compare settles it
            kv = read.kvs[0]
            stored = _decode(self._version_decoder, kv)
            if stored.token == token:
                committed_at = cast("datetime.datetime", stored.state.committed_at)
                self._succeed(group, int(kv.mod_revision), committed_at)
                return []
            ambiguous.remove(group_base)  # someone else's commit took that place in the chain
        retry = []
        for pending, revs in zip(group, actual, strict=True):
            conflicts = [
                Conflict(w.id, w.expected_rev, rev)
                for w, rev in zip(pending.writes, revs, strict=True)
                if rev != w.expected_rev
            ]
            if conflicts:
                _settle(pending.fut, None, ConflictError(conflicts))
            else:
                retry.append(pending)
        return retry

    def _succeed(self, group: list[_Pending], rev: int, committed_at: datetime.datetime) -> None:
        for pending in group:
            result = CommitResult(revs=[rev] * len(pending.writes), committed_at=committed_at)
            _settle(pending.fut, result, None)

    def _fail(self, group: list[_Pending], error: FlowstateError) -> None:
        for pending in group:
            _settle(pending.fut, None, _copy_error(error))

    # -- reads -----------------------------------------------------------------------------

    def _decode_version(self, kv: Any) -> State:
        state = _decode(self._version_decoder, kv).state
        state.rev = int(kv.mod_revision)
        return state

    async def get_state(self, state_id: str, rev: int = 0) -> State:
        """Return a state's version at ``rev``, or its latest version when ``rev`` is 0.

        Raises:
            NotFoundError: No such state, or ``rev`` is not one of its versions.
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_read(state_id, rev)
        self._check()
        keys = self._keys
        deadline = self._deadline()
        latest_key = keys.latest(state_id)
        if rev <= 0:
            _, (response,) = await self._read([_range(latest_key)], deadline)
            if not response.kvs:
                raise NotFoundError(f"state {state_id!r} not found")
            return self._decode_version(response.kvs[0])
        successor = keys.log_group(rev)
        _, (latest, after, head_read) = await self._read(
            [
                _range(latest_key),
                _range(successor, _prefix_end(successor), limit=1),
                _range(keys.head),
            ],
            deadline,
        )
        missing = NotFoundError(f"state {state_id!r} has no version at rev {rev}")
        if not latest.kvs:
            raise missing
        if latest.kvs[0].mod_revision == rev:
            return self._decode_version(latest.kvs[0])
        if after.kvs:
            group_base = _decode(self._version_decoder, after.kvs[0]).back
        else:
            head = self._parse_head(head_read)
            self._note_head(head)
            if head.rev != rev:
                raise missing
            group_base = head.prev
        start = keys.log_group(group_base)
        _, (group,) = await self._read([_range(start, _prefix_end(start))], deadline)
        for kv in group.kvs:
            if kv.mod_revision == rev:
                state = self._decode_version(kv)
                if state.id == state_id:
                    return state
        raise missing

    async def get_data(self, state_id: str, alias: str, rev: int = 0) -> tuple[int, bytes]:
        """Return ``(rev, blob)`` of the newest data under ``alias`` at or below ``rev``.

        ``rev`` 0 means the latest data version.

        Raises:
            NotFoundError: No such data.
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_read(state_id, rev, alias)
        self._check()
        start = self._keys.data(state_id, alias)
        request = _range(
            start, _prefix_end(start), limit=1, descending=True, max_mod_revision=max(rev, 0)
        )
        _, (response,) = await self._read([request], self._deadline())
        if not response.kvs:
            at = f" at rev {rev}" if rev else ""
            raise NotFoundError(f"state {state_id!r} has no data {alias!r}{at}")
        kv = response.kvs[0]
        return int(kv.mod_revision), bytes(kv.value)

    async def get_states(self, query: StatesQuery) -> StatesPage:
        """Return one page of the versions matching ``query``, ascending by revision.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        self._check()
        return await self._snapshot_read(functools.partial(self._read_page, query), "page")

    async def _start(
        self,
        since_rev: int,
        since_time: datetime.datetime | None,
        deadline: float,
        scanners: Sequence[_Scanner] = (),
    ) -> tuple[int, _Head, int | None]:
        """Read the head and where a scan must start.

        Returns the snapshot revision, the head, and the first ``H`` whose commits come after
        ``since_rev`` and at or after ``since_time`` (None when no commit does). ``scanners``
        (set to start at ``since_rev``) get their first chunk from the same read.
        """
        keys = self._keys
        requests = [s.request() for s in scanners]
        requests.append(_range(keys.head))
        if since_rev > 0:
            requests.append(
                _range(keys.log_base + b"%016x" % since_rev, _prefix_end(keys.log_base), limit=1)
            )
        if since_time is not None:
            start_key = keys.time_base + b"%012x" % _ceil_ms(since_time)
            requests.append(_range(start_key, _prefix_end(keys.time_base), limit=1, keys_only=True))
        snapshot, responses = await self._read(requests, deadline)
        for scanner, response in zip(scanners, responses, strict=False):
            scanner.feed(response)
        responses = responses[len(scanners) :]
        head = self._parse_head(responses[0])
        self._note_head(head)
        if head.rev <= since_rev:
            return snapshot, head, None
        start = 0
        if since_rev > 0:
            kvs = responses[1].kvs
            if not kvs:
                start = head.prev  # only the head commit comes after since_rev
            else:
                group_base, _ = _parse_pos(kvs[0].key)
                # since_rev is a revision of the store when a commit is keyed after it;
                # otherwise the commit before that one straddles since_rev.
                if group_base == since_rev:
                    start = since_rev
                else:
                    start = _decode(self._version_decoder, kvs[0]).back
        if since_time is not None:
            kvs = responses[-1].kvs
            if not kvs:
                return snapshot, head, None
            start = max(start, int(kvs[0].key[-16:], 16))
        return snapshot, head, start

    async def _read_page(self, query: StatesQuery, deadline: float) -> StatesPage:
        arms = self._arms(query)
        limit = query.limit
        chunk = min(limit + 1, _MAX_CHUNK)
        # Mostly ``since_rev`` is a revision of the store (a watcher's cursor, a page's last
        # version): then the scans start there, and their first chunk comes with the head.
        early = not query.since_latest and query.since_time is None
        scanners = self._scanners(arms, query.since_rev, chunk) if early else []
        snapshot, head, start = await self._start(
            query.since_rev, query.since_time, deadline, scanners
        )
        if start is None:
            return StatesPage(states=[], more=False, head_rev=head.rev)
        if query.since_latest:
            if arms is not None:
                found = await self._find_latest(
                    arms, query.latest_only, start, head, snapshot, deadline
                )
                if found is None:
                    return StatesPage(states=[], more=False, head_rev=head.rev)
                start = found
            else:
                start = head.prev  # every version of the head commit is the latest one
        if not early or start != query.since_rev:
            scanners = self._scanners(arms, start, chunk)
        matches: list[_Entry] = []
        more = False
        last = (-1, -1)
        while not more:
            batch, last = await self._pull(scanners, last, snapshot, deadline)
            if not batch:
                break
            if query.latest_only:
                batch = await self._keep_latest(batch, snapshot, deadline)
            for entry in batch:
                if len(matches) >= limit and entry.rev != matches[-1].rev:
                    more = True  # a page never splits a revision
                    break
                matches.append(entry)
        states = await self._states_of(matches, snapshot, deadline)
        return StatesPage(states=states, more=more, head_rev=head.rev)

    def _arms(self, query: StatesQuery) -> list[tuple[bytes, list[dict[str, str]]]] | None:
        """The posting ranges a query walks, each with the AND-maps its postings must match
        (any of them); None when it walks the log itself.

        An ``id`` filter walks the state's history, checking every label filter on it; a
        label filter walks the postings of the first pair of each AND-map.
        """
        label_sets = query.label_sets
        if query.id is not None:
            return [(self._keys.history(query.id), label_sets)]
        if not label_sets:
            return None
        keys = self._keys
        return [(keys.postings(*next(iter(wanted.items()))), [wanted]) for wanted in label_sets]

    def _scanners(
        self, arms: list[tuple[bytes, list[dict[str, str]]]] | None, start: int, chunk: int
    ) -> list[_Scanner]:
        """Scans of the log, or of each posting range of ``arms``, from commit ``H = start``."""
        if arms is None:
            log = self._keys.log_base
            return [_Scanner(log + b"%016x" % start, _prefix_end(log), chunk, None)]
        return [
            _Scanner(postings + b"%016x" % start, _prefix_end(postings), chunk, wanted)
            for postings, wanted in arms
        ]

    async def _pull(
        self,
        scanners: list[_Scanner],
        last: tuple[int, int],
        snapshot: int,
        deadline: float,
    ) -> tuple[list[_Entry], tuple[int, int]]:
        """The next entries of the merged scans, in order, deduplicated and filtered.

        Returns an empty list only when every scan is exhausted.
        """
        while True:
            need = [s for s in scanners if not s.buffer and not s.done]
            if need:
                _, responses = await self._read([s.request(snapshot) for s in need], deadline)
                for scanner, response in zip(need, responses, strict=True):
                    scanner.feed(response)
            out: list[_Entry] = []
            while True:
                live = [s for s in scanners if s.buffer or not s.done]
                if not live or any(not s.buffer for s in live):
                    break
                source = min(live, key=lambda s: s.buffer[0].pos)
                entry = source.buffer.popleft()
                if entry.pos == last:
                    continue  # the same version matched another AND-map
                if source.wanted is not None:
                    labels = _decode(self._posting_decoder, entry.kv).labels
                    if not _matches(labels, source.wanted):
                        continue
                else:
                    entry.state = self._decode_version(entry.kv)
                last = entry.pos
                out.append(entry)
            if out or all(s.done and not s.buffer for s in scanners):
                return out, last

    def _entry_id(self, entry: _Entry) -> str:
        if entry.state is not None:
            return entry.state.id
        return _decode(self._posting_decoder, entry.kv).id

    async def _keep_latest(
        self, entries: list[_Entry], snapshot: int, deadline: float
    ) -> list[_Entry]:
        """The entries that are still their state's latest version (order kept)."""
        ids = list(dict.fromkeys(self._entry_id(e) for e in entries))
        need_values = any(e.state is None for e in entries)
        requests = [
            _range(self._keys.latest(i), revision=snapshot, keys_only=not need_values) for i in ids
        ]
        _, responses = await self._read(requests, deadline)
        latest = {i: r.kvs[0] for i, r in zip(ids, responses, strict=True) if r.kvs}
        kept = []
        for entry in entries:
            kv = latest.get(self._entry_id(entry))
            if kv is None or kv.mod_revision != entry.rev:
                continue
            if entry.state is None:
                entry.state = self._decode_version(kv)
            kept.append(entry)
        return kept

    async def _states_of(
        self, entries: list[_Entry], snapshot: int, deadline: float
    ) -> list[State]:
        """The states of ``entries``, reading the versions that postings point at."""
        missing = [e for e in entries if e.state is None]
        if missing:
            keys = self._keys
            requests = [_range(keys.log(*e.pos), revision=snapshot) for e in missing]
            _, responses = await self._read(requests, deadline)
            for entry, response in zip(missing, responses, strict=True):
                entry.state = self._decode_version(response.kvs[0])
        return [cast("State", e.state) for e in entries]

    async def _find_latest(
        self,
        arms: list[tuple[bytes, list[dict[str, str]]]],
        latest_only: bool,
        floor: int,
        head: _Head,
        snapshot: int,
        deadline: float,
    ) -> int | None:
        """The ``H`` of the latest version matching ``arms`` at or after ``floor``.

        etcd ranges forwards only (a sorted range reads its whole range on the server), so
        this reads windows of revisions backwards from the head, doubling their width.
        """
        best: int | None = None
        for postings, wanted in arms:
            low = floor if best is None else max(floor, best)
            width = _FIRST_WINDOW
            lo = max(low, head.prev + 1 - width)
            hi_key = _prefix_end(postings)
            while True:
                request = _range(
                    postings + b"%016x" % lo,
                    hi_key,
                    limit=_BACKWARD_CHUNK,
                    revision=snapshot,
                    descending=True,
                )
                _, (response,) = await self._read([request], deadline)
                candidates = []
                for kv in response.kvs:
                    labels = _decode(self._posting_decoder, kv).labels
                    if _matches(labels, wanted):
                        candidates.append(_Entry(kv))
                if candidates and latest_only:
                    candidates = await self._keep_latest(candidates, snapshot, deadline)
                if candidates:
                    found = candidates[0].pos[0]
                    best = found if best is None else max(best, found)
                    break
                if response.more and response.kvs:
                    hi_key = bytes(response.kvs[-1].key)
                    continue
                if lo <= low:
                    break
                hi_key = postings + b"%016x" % lo
                width *= 2
                lo = max(low, lo - width)
        return best

    async def get_delays(self, since_rev: int = 0, limit: int = 100) -> DelaysPage:
        """Return delays committed after ``since_rev`` (exclusive), in commit order.

        Delays committed together are never split across pages.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_delays(since_rev, limit)
        self._check()
        return await self._snapshot_read(
            functools.partial(self._read_delays, since_rev, limit), "delay page"
        )

    async def _snapshot_read(self, read: Callable[[float], Awaitable[T]], what: str) -> T:
        """Run ``read(deadline)``, again when etcd compacted its snapshot under it."""
        deadline = self._deadline()
        for _ in range(3):
            try:
                return await read(deadline)
            except _CompactedError:
                continue  # the snapshot was compacted under the read: take a fresh one
        raise DriverError(f"etcd compacted the revision of every {what} read; try again")

    async def _read_delays(self, since_rev: int, limit: int, deadline: float) -> DelaysPage:
        snapshot, _, start = await self._start(since_rev, None, deadline)
        if start is None:
            return DelaysPage(delays=[], more=False)
        base = self._keys.delay_base
        scanner = _Scanner(base + b"%016x" % start, _prefix_end(base), max(1, limit) + 1, None)
        found: list[_Entry] = []
        more = False
        while not more and not scanner.done:
            request = _range(scanner.next_key, scanner.end, limit=scanner.chunk, revision=snapshot)
            _, (response,) = await self._read([request], deadline)
            kvs = response.kvs
            if response.more and kvs:
                scanner.next_key = bytes(kvs[-1].key) + b"\0"
                scanner.chunk = min(scanner.chunk * 2, _MAX_CHUNK)
            else:
                scanner.done = True
            for kv in kvs:
                entry = _Entry(kv)
                if len(found) >= limit and (not found or entry.rev != found[-1].rev):
                    more = True
                    break
                found.append(entry)
        delays = []
        for entry in found:
            delayed = _decode(self._delay_decoder, entry.kv)
            delayed.state.rev = entry.rev
            delays.append(delayed)
        return DelaysPage(delays=delays, more=more)

    # -- leases (SupportsLease) -------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Claim ``name`` for ``holder`` unless another holder's claim is still live.

        The claim is a key attached to an etcd lease of ``ttl`` seconds (rounded up to whole
        seconds, at least etcd's minimum): etcd deletes it when the lease expires.

        Returns:
            The lease (its token is the etcd lease id), or None when another holder's claim
            is live.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_lease_claim(name, holder, ttl)
        self._check()
        deadline = self._deadline()
        key = self._keys.lease(name)
        _, (current,) = await self._read([_range(key)], deadline)
        seen = current.kvs[0] if current.kvs else None
        if seen is not None and _decode(self._lease_decoder, seen).holder != holder:
            return None
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))

        async def grant(client: Any, seconds: float) -> Any:
            return await client.leasestub.LeaseGrant(
                request, timeout=seconds, metadata=client.metadata
            )

        granted = await self._call("lease grant", grant, deadline)
        lease_id = int(granted.ID)
        value = self._encoder.encode(_LeaseHolder(holder=holder, ttl=float(ttl)))
        claim = rpc.TxnRequest(
            compare=[_mod_is(key, seen.mod_revision if seen is not None else 0)],
            success=[_put(key, value, lease=lease_id)],
            failure=[_get(_range(key))],
        )
        response = await self._txn(claim, "lease claim", deadline)
        won = response.succeeded
        if not won:
            kvs = response.responses[0].response_range.kvs
            # An earlier attempt of this very claim may have landed before a retry.
            won = bool(kvs) and int(kvs[0].lease) == lease_id
        if not won:
            await self._revoke(lease_id, deadline)
            return None
        if seen is not None and seen.lease and int(seen.lease) != lease_id:
            await self._revoke(int(seen.lease), deadline)  # the holder's previous claim
        return Lease(name=name, holder=holder, token=lease_id, ttl=ttl)

    async def renew_lease(self, lease: Lease) -> Lease | None:
        """Extend a live claim by its ttl (one etcd keep-alive).

        Returns:
            The lease, or None when the claim was lost (expired, revoked or its key gone).

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_lease(lease)
        self._check()
        deadline = self._deadline()

        async def keep_alive(client: Any, seconds: float) -> int:
            call = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
            try:
                async with asyncio.timeout(seconds):
                    await call.write(rpc.LeaseKeepAliveRequest(ID=lease.token))
                    response = await call.read()
                    await call.done_writing()
                    # Read to the end so that the stream (and gRPC's task for it) is over.
                    while isinstance(await call.read(), rpc.LeaseKeepAliveResponse):
                        pass
            finally:
                call.cancel()
            if not isinstance(response, rpc.LeaseKeepAliveResponse):
                return 0
            return int(response.TTL)

        if await self._call("lease keep-alive", keep_alive, deadline) <= 0:
            return None
        _, (current,) = await self._read([_range(self._keys.lease(lease.name))], deadline)
        if not current.kvs or int(current.kvs[0].lease) != lease.token:
            await self._revoke(lease.token, deadline)  # alive, but no longer holds the key
            return None
        return lease

    async def release_lease(self, lease: Lease) -> None:
        """Give up a claim at once (revoke its etcd lease); releasing a lost claim does
        nothing.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_lease(lease)
        self._check()
        await self._revoke(lease.token, self._deadline())

    async def _revoke(self, lease_id: int, deadline: float) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)

        async def revoke(client: Any, seconds: float) -> None:
            try:
                await client.leasestub.LeaseRevoke(
                    request, timeout=seconds, metadata=client.metadata
                )
            except rpc.AioRpcError as exc:
                if exc.code() != rpc.StatusCode.NOT_FOUND:
                    raise  # NOT_FOUND: expired or revoked already

        await self._call("lease revoke", revoke, deadline)

    async def get_lease(self, name: str) -> Lease | None:
        """Return the live claim on ``name``, or None.

        Raises:
            ClosedError: The driver is not open.
            DriverUnavailableError: etcd could not be reached within ``timeout``.
            DriverError: etcd failed otherwise.
        """
        _args.check_lease_name(name)
        self._check()
        _, (current,) = await self._read([_range(self._keys.lease(name))], self._deadline())
        if not current.kvs:
            return None
        kv = current.kvs[0]
        stored = _decode(self._lease_decoder, kv)
        return Lease(name=name, holder=stored.holder, token=int(kv.lease), ttl=stored.ttl)


# -- URL parts ---------------------------------------------------------------------------------


def _matches(labels: dict[str, str], wanted: list[dict[str, str]]) -> bool:
    """True when ``labels`` satisfy any AND-map of ``wanted`` (always, when it is empty)."""
    if not wanted:
        return True
    return any(all(labels.get(k) == v for k, v in pairs.items()) for pairs in wanted)


def _parse_endpoint(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidURLError(f"bad etcd endpoint {text!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidURLError(f"bad etcd endpoint {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise InvalidURLError(f"bad etcd endpoint {text!r}: put IPv6 hosts in brackets")
    if not host:
        raise InvalidURLError(f"bad etcd endpoint {text!r}: no host")
    if not host.isprintable() or any(char.isspace() for char in host):
        raise InvalidURLError(f"bad etcd endpoint {text!r}: a space or control character")
    if not port_text:
        return host, DEFAULT_PORT
    port = _args.url_port(port_text)
    if port is None:
        raise InvalidURLError(f"bad etcd endpoint {text!r}: the port must be 1-65535")
    return host, port


def _redact(url: str) -> str:
    """``url`` with the password of any ``user:password@`` part replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}{slash}{tail}"


def _check_prefix(prefix: str) -> str:
    if not prefix:
        raise InvalidURLError("the etcd key prefix is empty")
    if "\0" in prefix:
        raise InvalidURLError(f"the etcd key prefix {prefix!r} contains a NUL character")
    if any(segment.startswith("~") for segment in prefix.split("/")):
        raise InvalidURLError(
            f"the etcd key prefix {prefix!r} has a segment starting with '~', "
            "which marks flowstate's own keys"
        )
    return prefix
