"""Xen event channels between two domains, with pending/coalescing semantics.

A port is allocated unbound for a remote domain (``EVTCHNOP_alloc_unbound``), the remote
binds it (``EVTCHNOP_bind_interdomain``), and then ``send`` on either end marks the *other*
end pending and wakes its waiter; several sends before the waiter runs coalesce into one
wake-up (a :class:`~vbusfs.platform.doorbell.Doorbell` per port). ``count`` on each port
is the number of events delivered to it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from vbusfs.platform.doorbell import Doorbell

__all__ = ["EventChannels", "EvtchnError", "Port"]


class EvtchnError(OSError):
    pass


@dataclass
class Port:
    domid: int
    port: int
    remote_domid: int
    peer: Port | None = None
    bell: Doorbell = field(default_factory=Doorbell)


class EventChannels:
    def __init__(self) -> None:
        self._ports: dict[tuple[int, int], Port] = {}
        self._next: dict[int, int] = {}

    def _new(self, domid: int, remote: int) -> Port:
        n = self._next.get(domid, 1)     # port 0 is never valid
        self._next[domid] = n + 1
        p = Port(domid, n, remote)
        p.bell.name = f"evtchn d{domid}p{n}"
        self._ports[(domid, n)] = p
        return p

    def get(self, domid: int, port: int) -> Port:
        p = self._ports.get((domid, port))
        if p is None:
            raise EvtchnError(errno.EINVAL, f"domain {domid} has no event channel {port}")
        return p

    def alloc_unbound(self, domid: int, remote_domid: int) -> int:
        return self._new(domid, remote_domid).port

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int) -> int:
        remote = self.get(remote_domid, remote_port)
        if remote.remote_domid != domid:
            raise EvtchnError(errno.EACCES, f"port {remote_port} of domain {remote_domid} is "
                              f"not offered to domain {domid}")
        if remote.peer is not None:
            raise EvtchnError(errno.EBUSY, f"port {remote_port} of domain {remote_domid} "
                              "is already bound")
        local = self._new(domid, remote_domid)
        local.peer, remote.peer = remote, local
        return local.port

    def send(self, domid: int, port: int) -> None:
        """``EVTCHNOP_send``: make the other end pending."""
        p = self._ports.get((domid, port))
        if p is None:
            raise EvtchnError(errno.EINVAL, f"domain {domid} has no event channel {port}")
        peer = p.peer
        if peer is not None:
            peer.bell.ring()

    def close(self, domid: int, port: int) -> None:
        p = self._ports.pop((domid, port), None)
        if p is not None and p.peer is not None:
            p.peer.peer = None

    def bound(self, domid: int) -> int:
        return sum(1 for (d, _), p in self._ports.items() if d == domid and p.peer)
