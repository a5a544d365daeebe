"""The VMBus ring buffer against reference/protocols.md §3.1–3.2 and Linux ring_buffer.c."""

import struct

import pytest

from vbusfs.protocols.vmbus.ring import PAGE_SIZE, Ring, RingError, init_ring


def make(pages: int = 2) -> tuple[memoryview, Ring, Ring]:
    """One ring in fresh memory, seen by a producer and a consumer."""
    mem = memoryview(bytearray(pages * PAGE_SIZE))
    init_ring(mem)
    return mem, Ring(mem), Ring(mem)


def hdr(mem: memoryview, off: int) -> int:
    return int(struct.unpack_from("<I", mem, off)[0])


def test_init_sets_feature_bit_and_zero_indices() -> None:
    mem, _, _ = make()
    assert hdr(mem, 0) == hdr(mem, 4) == hdr(mem, 8) == hdr(mem, 12) == 0
    assert hdr(mem, 64) & 1 == 1           # feat_pending_send_sz


def test_packet_framing() -> None:
    mem, prod, cons = make()
    payload = bytes(range(44))
    written, signal = prod.write(6, 0, 0x1122334455, payload)
    assert written and signal                     # empty ring, nothing masked
    # descriptor 16 + 44 payload, padded to 64 (len8 = 8), then the 8-byte trailer
    assert hdr(mem, 0) == 72
    data = mem[PAGE_SIZE:]
    assert struct.unpack_from("<HHHHQ", data, 0) == (6, 2, 8, 0, 0x1122334455)
    assert bytes(data[16:60]) == payload and bytes(data[60:64]) == bytes(4)
    assert struct.unpack_from("<Q", data, 64)[0] == 0 << 32       # previous start index
    pkt = cons.read()
    assert pkt is not None and pkt.type == 6 and pkt.trans_id == 0x1122334455
    assert pkt.payload == payload + bytes(4)     # what vmbus_recvpacket hands on: padded
    assert cons.read() is None
    assert hdr(mem, 4) == 0                       # nothing published before commit
    cons.commit_read()
    assert hdr(mem, 4) == 72


def test_second_write_does_not_signal_and_mask_suppresses() -> None:
    _, prod, cons = make()
    assert prod.write(6, 0, 1, b"x" * 8) == (True, True)
    assert prod.write(6, 0, 2, b"y" * 8) == (True, False)   # ring was not empty
    while cons.read():
        pass
    cons.commit_read()
    cons.interrupt_mask = 1
    assert prod.write(6, 0, 3, b"z" * 8) == (True, False)   # reader asked for no interrupts


def test_ring_never_becomes_exactly_full_and_wraps() -> None:
    mem, prod, cons = make()
    dsize = PAGE_SIZE
    sent = received = 0
    for _lap in range(50):                      # many laps around a 4 KiB ring
        for _ in range(dsize // 64 + 1):          # bounded: a writer that never stops fails
            ok, _ = prod.write(6, 0, sent, struct.pack("<Q", sent) * 5)
            if not ok:
                break
            sent += 1
            assert prod.bytes_to_write() > 0
        # a full ring is never mistaken for an empty one: all 63 packets are readable
        assert hdr(mem, 0) != hdr(mem, 4)
        assert cons.bytes_to_read() == (dsize // 64 - 1) * 64
        while (pkt := cons.read()) is not None:
            assert struct.unpack_from("<Q", pkt.payload)[0] == received
            received += 1
        cons.commit_read()
    # 64-byte packets: one slot always stays free, so 63 fit per lap
    assert sent == received == 50 * (dsize // 64 - 1)


def test_packets_of_every_size_straddle_the_end_and_read_back() -> None:
    """Packets of sizes that do not divide the ring, with and without a descriptor
    extension, so that the descriptor, the extension, the payload and the trailer each land
    across the end of the data area on some lap: every one reads back byte for byte, and
    its trailer holds the write index it started at (§3.1)."""
    mem, prod, cons = make()
    sent: list[tuple[int, bytes, bytes]] = []
    n = 0
    straddled = 0
    for size in [8 * k + j for k in range(40) for j in (0, 3)] * 6:
        header = struct.pack("<IIII", 0, 1, size, n % 4096) if n % 3 == 0 else b""
        payload = bytes((n + i) % 251 for i in range(size))
        start = hdr(mem, 0)
        ok, _ = prod.write(9 if header else 6, 1, n, payload, header)
        if not ok:                                   # full: drain and go on
            while (pkt := cons.read()) is not None:
                t, h, p = sent.pop(0)
                assert (pkt.trans_id, pkt.header, pkt.payload[:len(p)]) == (t, h, p)
            cons.commit_read()
            assert not sent
            start = hdr(mem, 0)
            ok, _ = prod.write(9 if header else 6, 1, n, payload, header)
        assert ok
        end = hdr(mem, 0)
        straddled += end < start
        trailer_at = PAGE_SIZE + (end - 8) % PAGE_SIZE
        assert struct.unpack_from("<Q", mem, trailer_at)[0] == start << 32
        sent.append((n, header, payload))
        n += 1
    while (pkt := cons.read()) is not None:
        t, h, p = sent.pop(0)
        assert (pkt.trans_id, pkt.header, pkt.payload[:len(p)]) == (t, h, p)
    assert not sent and straddled >= 20


@pytest.mark.parametrize(("w", "r"), [(PAGE_SIZE, 0), (0, PAGE_SIZE + 8), (4, 0), (0, 12)])
def test_impossible_indices_rejected(w: int, r: int) -> None:
    mem, _, cons = make()
    struct.pack_into("<II", mem, 0, w, r)
    with pytest.raises(RingError):
        cons.read()


def test_hostile_packet_lengths_rejected() -> None:
    mem, prod, cons = make()
    prod.write(6, 0, 1, bytes(24))
    data = mem[PAGE_SIZE:]
    struct.pack_into("<H", data, 4, 200)              # len8 far beyond what was written
    with pytest.raises(RingError):
        cons.read()
    mem2, prod2, cons2 = make()
    prod2.write(6, 0, 1, bytes(24))
    struct.pack_into("<H", mem2[PAGE_SIZE:], 2, 1)    # offset8 smaller than the descriptor
    with pytest.raises(RingError):
        cons2.read()


def test_pending_send_sz_wakes_blocked_writer_only_when_room() -> None:
    _, prod, cons = make()
    while prod.write(6, 0, 0, bytes(200))[0]:
        pass
    need = 16 + 200 + 16
    prod.pending_send_sz = need                     # writer blocked, says what it needs
    cons.read()
    assert cons.commit_read() is True               # free space now exceeds the need
    prod.pending_send_sz = 0
    cons.read()
    assert cons.commit_read() is False              # nobody waiting: no signal


def test_ring_needs_header_and_data() -> None:
    with pytest.raises(RingError):
        Ring(memoryview(bytearray(PAGE_SIZE)))
