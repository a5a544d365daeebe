"""xenstored: the store, its watches and transactions, and the daemon serving domains.

* Paths are absolute inside the store; a connection resolves relative paths against its
  domain's home ``/local/domain/<domid>``. Writing a node creates missing parents with empty
  values, as xenstored does; removing one removes its subtree.
* A watch fires once when registered, then whenever the watched node or anything below it is
  written, created or removed (and, for a removal, for watches on nodes inside the removed
  subtree). Events carry the changed path in the watcher's own form (relative if it watched a
  relative path) and the token.
* Transactions see a private copy of the store; at commit they fail with ``EAGAIN`` if any node
  they read or wrote changed since they started, else their changes apply atomically and fire
  their watches then.
* :class:`XenstoreDaemon` serves a guest over ``xenstore_domain_interface`` in guest memory and
  an event channel — the guest never calls into this module (reference/protocols.md §1.4).
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio

from vbusfs.platform.memory import GuestMemory
from vbusfs.platform.xen.event_channel import EventChannels
from vbusfs.platform.xen.xs_ring import RingIndexError, request_ring, response_ring
from vbusfs.protocols.xen import xenstore as xs

log = logging.getLogger(__name__)

__all__ = ["Store", "Transaction", "Watch", "XenstoreDaemon", "domain_path"]

_PATH_CHARS = re.compile(r"^[A-Za-z0-9_@/\-.]*$")
ABS_PATH_MAX, REL_PATH_MAX = 3072, 2048
Deliver = Callable[[str, str], None]      # (absolute path that changed, token)


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def _err(code: int, message: str) -> OSError:
    return OSError(code, message)


def check_path(path: str) -> str:
    """An absolute, canonical store path, or EINVAL (xenstored's is_valid_nodename)."""
    if not path.startswith("/") or len(path) > ABS_PATH_MAX or \
            (path != "/" and path.endswith("/")) or "//" in path or \
            not _PATH_CHARS.match(path):
        raise _err(errno.EINVAL, f"invalid xenstore path {path!r}")
    return path


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass
class _Node:
    value: str = ""
    children: dict[str, None] = field(default_factory=dict)   # an ordered set


@dataclass
class Watch:
    path: str             # absolute
    token: str
    deliver: Deliver


class _Nodes:
    """The node map and the operations shared by the store and its transactions."""

    def __init__(self, nodes: dict[str, _Node]) -> None:
        self.nodes = nodes

    def _touch(self, path: str) -> None:   # overridden to track changes
        pass

    def _access(self, path: str) -> None:  # overridden to track reads
        pass

    def exists(self, path: str) -> bool:
        self._access(path)
        return check_path(path) in self.nodes

    def read(self, path: str) -> str:
        self._access(path)
        node = self.nodes.get(check_path(path))
        if node is None:
            raise _err(errno.ENOENT, path)
        return node.value

    def directory(self, path: str) -> list[str]:
        self._access(path)
        node = self.nodes.get(check_path(path))
        if node is None:
            raise _err(errno.ENOENT, path)
        return list(node.children)

    def _create(self, path: str) -> None:
        if path in self.nodes:
            return
        parent = _parent(path)
        self._create(parent)
        self.nodes[path] = _Node()
        self.nodes[parent].children[path.rsplit("/", 1)[1]] = None
        self._touch(path)
        self._touch(parent)

    def write(self, path: str, value: str) -> None:
        check_path(path)
        if path == "/":
            raise _err(errno.EINVAL, "cannot write the root")
        self._create(path)
        self.nodes[path].value = value
        self._touch(path)

    def mkdir(self, path: str) -> None:
        check_path(path)
        self._create(path)

    def rm(self, path: str) -> list[str]:
        """Remove ``path`` and its subtree; returns the removed paths."""
        check_path(path)
        if path == "/":
            raise _err(errno.EINVAL, "cannot remove the root")
        if path not in self.nodes:
            if _parent(path) not in self.nodes:
                raise _err(errno.ENOENT, path)
            return []          # xenstored: removing a missing child of a live node is OK
        gone = [p for p in self.nodes if _under(p, path)]
        for p in gone:
            del self.nodes[p]
            self._touch(p)
        parent = _parent(path)
        del self.nodes[parent].children[path.rsplit("/", 1)[1]]
        self._touch(parent)
        return gone


class Store(_Nodes):
    def __init__(self) -> None:
        super().__init__({"/": _Node()})
        self.generation = 0
        self._gen: dict[str, int] = {}       # last generation a path changed in (also removed)
        self.watches: list[Watch] = []
        self._next_tx = 1
        self.transactions: dict[int, Transaction] = {}

    def _touch(self, path: str) -> None:
        self.generation += 1
        self._gen[path] = self.generation

    def changed_since(self, path: str, generation: int) -> bool:
        return self._gen.get(path, 0) > generation

    # -- operations that fire watches -------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        super().write(path, value)
        self._fire(path)

    def mkdir(self, path: str) -> None:
        existed = path in self.nodes
        super().mkdir(path)
        if not existed:
            self._fire(path)

    def rm(self, path: str) -> list[str]:
        gone = super().rm(path)
        if gone:
            self._fire(path, removed=True)
        return gone

    def _fire(self, path: str, removed: bool = False) -> None:
        for w in list(self.watches):
            if _under(path, w.path) or (removed and _under(w.path, path)):
                w.deliver(path, w.token)

    def watch(self, path: str, token: str, deliver: Deliver) -> Watch:
        w = Watch(check_path(path), token, deliver)
        self.watches.append(w)
        deliver(w.path, token)            # xenstored fires every new watch once
        return w

    def unwatch(self, w: Watch) -> None:
        if w in self.watches:
            self.watches.remove(w)

    # -- transactions -------------------------------------------------------------------------
    def transaction(self) -> Transaction:
        tx = Transaction(self, self._next_tx)
        self._next_tx += 1
        self.transactions[tx.id] = tx
        return tx

    def walk(self, top: str = "/") -> Iterator[tuple[str, str]]:
        """(path, value) for every node at or below ``top``, parents first."""
        node = self.nodes.get(top)
        if node is None:
            return
        yield top, node.value
        for name in list(node.children):
            yield from self.walk(f"{top.rstrip('/')}/{name}")


class Transaction(_Nodes):
    def __init__(self, store: Store, tx_id: int) -> None:
        super().__init__({p: _Node(n.value, dict(n.children)) for p, n in store.nodes.items()})
        self.store = store
        self.id = tx_id
        self.start = store.generation
        self.accessed: set[str] = set()
        self.ops: list[tuple[str, str, str]] = []

    def _access(self, path: str) -> None:
        self.accessed.add(path)

    def _touch(self, path: str) -> None:
        self.accessed.add(path)

    def write(self, path: str, value: str) -> None:
        super().write(path, value)
        self.ops.append(("write", path, value))

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self.ops.append(("mkdir", path, ""))

    def rm(self, path: str) -> list[str]:
        gone = super().rm(path)
        self.ops.append(("rm", path, ""))
        return gone

    def end(self, commit: bool) -> None:
        """Commit (or abort); raises EAGAIN when another change got there first."""
        self.store.transactions.pop(self.id, None)
        if not commit:
            return
        if any(self.store.changed_since(p, self.start) for p in self.accessed):
            raise _err(errno.EAGAIN, "transaction conflicted with another change")
        for op, path, value in self.ops:
            if op == "write":
                self.store.write(path, value)
            elif op == "mkdir":
                self.store.mkdir(path)
            else:
                try:
                    self.store.rm(path)
                except OSError:
                    pass


class _Connection:
    """One domain's connection: its interface page, event channel, transactions, watches."""

    def __init__(self, daemon: XenstoreDaemon, domid: int, page: memoryview, port: int) -> None:
        self.daemon = daemon
        self.domid = domid
        self.home = domain_path(domid)
        self.page = page
        self.port = port
        self.req = request_ring(page)
        self.rsp = response_ring(page)
        self.out = bytearray()
        self.inbuf = bytearray()
        self.tx: dict[int, Transaction] = {}
        self.watches: dict[tuple[str, str], Watch] = {}
        self.requests = 0
        self.broken = False

    def absolute(self, path: str) -> str:
        if path.startswith("/"):
            return check_path(path)
        if not path or len(path) > REL_PATH_MAX:
            raise _err(errno.EINVAL, f"invalid relative xenstore path {path!r}")
        return check_path(f"{self.home}/{path}")

    def relative(self, path: str, as_given: str) -> str:
        if as_given.startswith("/"):
            return path
        return path[len(self.home) + 1:] if path.startswith(self.home + "/") else path

    def queue(self, msg_type: int, req_id: int, tx_id: int, payload: bytes) -> None:
        self.out += xs.pack(msg_type, req_id, tx_id, payload)

    def flush(self) -> None:
        if self.broken or not self.out:
            return
        n = self.rsp.write(memoryview(self.out))
        del self.out[:n]
        if n:
            self.daemon.evtchn.send(self.daemon.domid, self.port)


class XenstoreDaemon:
    def __init__(self, store: Store, memory: GuestMemory, evtchn: EventChannels,
                 domid: int = 0) -> None:
        self.store = store
        self.memory = memory
        self.evtchn = evtchn
        self.domid = domid
        self.connections: dict[int, _Connection] = {}

    def introduce(self, domid: int, page_pfn: int, port: int) -> _Connection:
        """``XS_INTRODUCE``: the toolstack hands xenstored a domain's page and port."""
        conn = _Connection(self, domid, self.memory.view(page_pfn), port)
        self.connections[domid] = conn
        return conn

    async def serve(self, domid: int, *, task_status: trio.TaskStatus[None] =
                    trio.TASK_STATUS_IGNORED) -> None:
        conn = self.connections[domid]
        bell = self.evtchn.get(self.domid, conn.port).bell
        task_status.started()
        while not conn.broken:
            await bell.wait()
            self.pump(conn)

    def pump(self, conn: _Connection) -> None:
        """Take every byte the guest wrote (messages may span ring wraps and be larger than
        the ring), answer each complete message, then push out what fits."""
        try:
            n = conn.req.readable()
            if n:
                conn.inbuf += conn.req.read(n)
                self.evtchn.send(self.domid, conn.port)     # room in the request ring
        except RingIndexError as e:
            self._break(conn, 2, str(e))                                   # ERROR_RINGIDX
            return
        while len(conn.inbuf) >= xs.HEADER.size:
            msg_type, req_id, tx_id, length = xs.HEADER.unpack_from(conn.inbuf)
            if length > xs.PAYLOAD_MAX:
                self._break(conn, 3, f"payload of {length} bytes")         # ERROR_PROTO
                return
            end = xs.HEADER.size + length
            if len(conn.inbuf) < end:
                break
            payload = bytes(conn.inbuf[xs.HEADER.size:end])
            del conn.inbuf[:end]
            self._handle(conn, msg_type, req_id, tx_id, payload)
        conn.flush()

    def _break(self, conn: _Connection, code: int, why: str) -> None:
        log.warning("xenstore: domain %d broke the protocol (%s); connection closed",
                    conn.domid, why)
        conn.page[xs.ERROR_FIELD:xs.ERROR_FIELD + 4] = code.to_bytes(4, "little")
        conn.broken = True

    def _handle(self, conn: _Connection, msg_type: int, req_id: int, tx_id: int,
                payload: bytes) -> None:
        conn.requests += 1
        try:
            reply = self._dispatch(conn, msg_type, req_id, tx_id, payload)
        except _Replied:
            return
        except OSError as e:
            conn.queue(xs.XsType.ERROR, req_id, tx_id,
                       xs.errno_name(e.errno or errno.EIO).encode() + b"\0")
            return
        conn.queue(msg_type, req_id, tx_id, reply)

    def _dispatch(self, conn: _Connection, msg_type: int, req_id: int, tx_id: int,
                  payload: bytes) -> bytes:
        args = xs.split_strings(payload)
        target: _Nodes = self.store
        if tx_id:
            tx = conn.tx.get(tx_id)
            if tx is None:
                raise _err(errno.ENOENT, f"no transaction {tx_id}")
            target = tx

        def arg(i: int) -> str:
            if len(args) <= i:
                raise _err(errno.EINVAL, "missing argument")
            return args[i]

        if msg_type == xs.XsType.READ:
            return target.read(conn.absolute(arg(0))).encode()
        if msg_type == xs.XsType.WRITE:
            raw_path, _, raw_value = payload.partition(b"\0")
            target.write(conn.absolute(raw_path.decode("utf-8", "replace")),
                         raw_value.decode("utf-8", "replace"))
            return b"OK\0"
        if msg_type == xs.XsType.MKDIR:
            target.mkdir(conn.absolute(arg(0)))
            return b"OK\0"
        if msg_type == xs.XsType.RM:
            target.rm(conn.absolute(arg(0)))
            return b"OK\0"
        if msg_type == xs.XsType.DIRECTORY:
            return b"".join(n.encode() + b"\0" for n in target.directory(conn.absolute(arg(0))))
        if msg_type == xs.XsType.GET_PERMS:
            target.read(conn.absolute(arg(0)))
            return b"b0\0"           # no permission model: everyone may read and write
        if msg_type == xs.XsType.SET_PERMS:
            target.read(conn.absolute(arg(0)))
            return b"OK\0"
        if msg_type == xs.XsType.WATCH:
            given, token = arg(0), arg(1)
            path = conn.absolute(given)
            if (path, token) in conn.watches:
                raise _err(errno.EEXIST, "watch already registered")

            def deliver(changed: str, tok: str, given: str = given) -> None:
                conn.queue(xs.XsType.WATCH_EVENT, 0, 0,
                           conn.relative(changed, given).encode() + b"\0" + tok.encode() + b"\0")
                conn.flush()

            conn.queue(msg_type, req_id, tx_id, b"OK\0")   # the reply precedes the event
            conn.watches[(path, token)] = self.store.watch(path, token, deliver)
            raise _Replied
        if msg_type == xs.XsType.UNWATCH:
            w = conn.watches.pop((conn.absolute(arg(0)), arg(1)), None)
            if w is None:
                raise _err(errno.ENOENT, "no such watch")
            self.store.unwatch(w)
            return b"OK\0"
        if msg_type == xs.XsType.RESET_WATCHES:
            for w in conn.watches.values():
                self.store.unwatch(w)
            conn.watches.clear()
            return b"OK\0"
        if msg_type == xs.XsType.TRANSACTION_START:
            if tx_id:
                raise _err(errno.EBUSY, "nested transaction")
            tx = self.store.transaction()
            conn.tx[tx.id] = tx
            return f"{tx.id}\0".encode()
        if msg_type == xs.XsType.TRANSACTION_END:
            tx = conn.tx.pop(tx_id, None)
            if tx is None:
                raise _err(errno.ENOENT, "no transaction")
            verdict = arg(0)
            if verdict not in ("T", "F"):
                raise _err(errno.EINVAL, "transaction end takes T or F")
            tx.end(commit=verdict == "T")
            return b"OK\0"
        if msg_type == xs.XsType.GET_DOMAIN_PATH:
            if not arg(0).isdigit():
                raise _err(errno.EINVAL, "not a domain id")
            return domain_path(int(arg(0))).encode() + b"\0"
        raise _err(errno.ENOSYS, f"xenstore message type {msg_type} is not supported")


class _Replied(Exception):
    """Internal: the handler queued its own reply (WATCH must precede its first event)."""
