"""storvsp on an open channel with no storvsc in front of it: the test is the guest, writing
whatever packets it likes into the real ring in guest memory and reading the host's answers
off the other ring. No VMBus handshake: the channel is opened as the server would open it
(rings in guest memory, the model's run task, its doorbell), which keeps each generated
example cheap."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from backends.scsi.disk import ScsiDiskParams
from backends.vmbus.channel import ChannelSpec, HostChannel
from backends.vmbus.storvsp import HOST_VERSIONS, MAX_TRANSFER, Storvsp
from vbusfs.platform.memory import PAGE_SIZE, GuestMemory
from vbusfs.platform.vmbus.ring_endpoint import RingEndpoint
from vbusfs.protocols.vmbus import storvsc as sv
from vbusfs.protocols.vmbus.ring import (
    COMPLETION_REQUESTED,
    GpaRange,
    Packet,
    PacketType,
    Ring,
    init_ring,
    pack_gpa_direct,
)

RING_PAGES = 8                   # each way: a header page and 7 data pages
DISK_ID = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")


def params(image: Path, **kw: object) -> ScsiDiskParams:
    base: dict[str, object] = dict(
        name="lun", image=image, size=1 << 20, readonly=False, sector_size=512,
        serial="SER-0001", vendor="Msft", model="Virtual Disk", rotational=False,
        unmap=True, write_cache=True, disk_id=DISK_ID)
    base.update(kw)
    return ScsiDiskParams(**base)  # type: ignore[arg-type]


@dataclass
class Answer:
    type: int
    flags: int
    trans_id: int
    payload: bytes

    @property
    def operation(self) -> int:
        return int.from_bytes(self.payload[0:4], "little")

    @property
    def status(self) -> int:
        return int.from_bytes(self.payload[8:12], "little")

    @property
    def srb(self) -> sv.Srb:
        return sv.Srb.unpack(self.payload[12:])


@dataclass
class Harness:
    memory: GuestMemory
    model: Storvsp
    chan: HostChannel
    to_host: Ring                      # the guest's producer end
    from_host: Ring                    # the guest's consumer end
    ring_pfn: int
    data_pfn: int                      # DATA_PAGES pages the test may use as buffers
    signalled: trio.Event = field(default_factory=trio.Event)
    got: list[Answer] = field(default_factory=list)

    DATA_PAGES = 64

    def data(self, page: int = 0, n: int = 1) -> memoryview:
        return self.memory.view(self.data_pfn + page, n)

    def send(self, payload: bytes, *, ptype: int = PacketType.DATA_INBAND,
             flags: int = COMPLETION_REQUESTED, trans_id: int = 1,
             header: bytes = b"") -> None:
        """Put one packet on the ring and ring the host's doorbell (HvSignalEvent)."""
        written, _ = self.to_host.write(ptype, flags, trans_id, payload, header)
        assert written, "the test overfilled the ring"
        self.chan.doorbell.ring()

    def srb(self, cdb: bytes, *, lun: int = 0, length: int = 0, data_in: int = 1,
            pages: list[int] | None = None, offset: int = 0, trans_id: int = 1,
            target: int = 0, path: int = 0, size: int = sv.VSTOR_PACKET_SIZE) -> None:
        """An EXECUTE_SRB as Linux builds it; with ``length``, data in the harness's pages
        (GPA-direct, one range)."""
        srb = sv.Srb(path_id=path, target_id=target, lun=lun, cdb_length=len(cdb),
                     data_in=data_in, data_transfer_length=length, cdb=cdb)
        payload = sv.pack_packet(sv.Operation.EXECUTE_SRB, srb.pack(),
                                 flags=sv.REQUEST_COMPLETION_FLAG, size=size)
        if length:
            n = -(-(offset + length) // PAGE_SIZE)
            pfns = pages if pages is not None else \
                list(range(self.data_pfn, self.data_pfn + n))
            self.send(payload, ptype=PacketType.DATA_USING_GPA_DIRECT, trans_id=trans_id,
                      header=pack_gpa_direct([GpaRange(length, offset, tuple(pfns))]))
        else:
            self.send(payload, trans_id=trans_id)

    def drain(self) -> None:
        while (pkt := self.from_host.read()) is not None:
            self.got.append(_answer(pkt))
        self.from_host.commit_read()

    async def answers(self, n: int, timeout: float = 5.0) -> list[Answer]:
        """Wait until ``n`` answers have come (since the last call) and return them."""
        with trio.fail_after(timeout):
            while True:
                self.drain()
                if len(self.got) >= n:
                    out, self.got = self.got[:n], self.got[n:]
                    return out
                ev = self.signalled = trio.Event()
                self.drain()
                if len(self.got) >= n:
                    continue
                with trio.move_on_after(0.05):
                    await ev.wait()

    async def call(self, payload: bytes, **kw: object) -> Answer:
        self.send(payload, **kw)  # type: ignore[arg-type]
        (a,) = await self.answers(1)
        return a

    async def init(self, version: int = sv.ProtocolVersion.WIN8_1) -> None:
        """BEGIN, the version, properties, END, as Linux does."""
        for op, body in ((sv.Operation.BEGIN_INITIALIZATION, b""),
                         (sv.Operation.QUERY_PROTOCOL_VERSION, sv.VERSION.pack(version, 0)),
                         (sv.Operation.QUERY_PROPERTIES, b""),
                         (sv.Operation.END_INITIALIZATION, b"")):
            a = await self.call(sv.pack_packet(op, body, flags=1), trans_id=sv.VMBUS_RQST_INIT)
            assert a.status == 0, (op, hex(a.status))


def _answer(pkt: Packet) -> Answer:
    return Answer(pkt.type, pkt.flags, pkt.trans_id, pkt.payload)


@asynccontextmanager
async def storvsp_channel(luns: dict[int, ScsiDiskParams], *,
                          versions: tuple[int, ...] = HOST_VERSIONS,
                          max_transfer: int = MAX_TRANSFER,
                          memory: GuestMemory | None = None) -> AsyncIterator[Harness]:
    mem = memory or GuestMemory(16 << 20)
    model = Storvsp("storvsp test", luns.items(), versions=versions, max_transfer=max_transfer)
    ring = mem.alloc(2 * RING_PAGES)
    data = mem.alloc(Harness.DATA_PAGES)
    out_view, in_view = mem.view(ring, RING_PAGES), mem.view(ring + RING_PAGES, RING_PAGES)
    init_ring(out_view)
    init_ring(in_view)
    harness: Harness | None = None

    def signal_guest() -> None:
        assert harness is not None
        harness.signalled.set()

    chan = HostChannel(ChannelSpec("scsi", uuid.uuid4(), uuid.uuid4(), model), 1, None)
    chan.endpoint = RingEndpoint(Ring(out_view), Ring(in_view), chan.doorbell, signal_guest,
                                 "storvsp test")
    chan.memory = mem
    chan.ring_pfns = range(ring, ring + 2 * RING_PAGES)
    harness = Harness(mem, model, chan, Ring(out_view), Ring(in_view), ring, data)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(model.serve_images)
            nursery.start_soon(model.run, chan)
            await trio.sleep(0)
            try:
                yield harness
            finally:
                for disk in model.luns.values():
                    if disk.executor is not None:
                        await disk.executor.wait_idle()
                nursery.cancel_scope.cancel()
    finally:
        mem.free(ring, 2 * RING_PAGES)
        mem.free(data, Harness.DATA_PAGES)
