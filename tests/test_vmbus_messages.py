"""Channel message layouts against reference/protocols.md §3.3 (sizes and offsets)."""

import struct
import uuid

import pytest

from vbusfs.protocols.vmbus import messages as m

NIC = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
INST = uuid.UUID("58f75a6d-d949-4320-99e1-a2a2576d581c")


@pytest.mark.parametrize(("cls", "size"), [
    (m.OfferChannel, 196), (m.InitiateContact, 40), (m.VersionResponse, 16),
    (m.OpenChannel, 148), (m.OpenResult, 20), (m.GpadlCreated, 20), (m.GpadlTeardown, 16),
    (m.GpadlTorndown, 12), (m.CloseChannel, 12), (m.RescindOffer, 12), (m.RelidReleased, 12),
    (m.ModifyChannel, 16), (m.ModifyChannelResponse, 16),
])
def test_struct_sizes(cls: type, size: int) -> None:
    assert cls.FMT.size == size  # type: ignore[attr-defined]


def test_message_type_numbers() -> None:
    assert (m.MessageType.OFFERCHANNEL, m.MessageType.INITIATE_CONTACT,
            m.MessageType.VERSION_RESPONSE, m.MessageType.MODIFYCHANNEL_RESPONSE) == (1, 14, 15, 24)


def test_offer_offsets() -> None:
    offer = m.OfferChannel(NIC, INST, 0x10, 0, b"\x04".ljust(120, b"\0"), 0, 0x1234, 7, True, False,
                           0xABCDEF)
    buf = offer.pack()
    assert len(buf) == 196
    assert struct.unpack_from("<I", buf, 0)[0] == 1
    assert buf[8:24] == NIC.bytes_le and buf[24:40] == INST.bytes_le
    assert struct.unpack_from("<H", buf, 8 + 48)[0] == 0x10          # chn_flags
    assert buf[8 + 52:8 + 56] == b"\x04\0\0\0"                       # user-defined area
    assert struct.unpack_from("<I", buf, 184)[0] == 0x1234           # child_relid
    assert buf[188] == 7 and buf[189] & 1 == 1                       # monitorid, allocated
    assert struct.unpack_from("<I", buf, 192)[0] == 0xABCDEF         # connection_id
    assert m.OfferChannel.unpack(buf) == offer


def test_initiate_contact_offsets() -> None:
    buf = m.InitiateContact(m.Version.WIN10_V5_3, 0, 2, 0, 0x1000, 0x2000).pack()
    assert struct.unpack_from("<I", buf, 8)[0] == 0x00050003
    assert buf[16] == 2                                              # msg_sint
    assert struct.unpack_from("<QQ", buf, 24) == (0x1000, 0x2000)


def test_version_response_offsets() -> None:
    buf = bytearray(16)
    struct.pack_into("<IIBBxxI", buf, 0, 15, 0, 1, 0, 4)
    r = m.VersionResponse.unpack(bytes(buf))
    assert r.version_supported and r.msg_conn_id == 4


def test_open_channel_offsets() -> None:
    buf = m.OpenChannel(5, 6, 0xE1E10, 1, 4).pack()
    assert struct.unpack_from("<IIIII", buf, 8) == (5, 6, 0xE1E10, 1, 4)


def test_gpadl_capacity() -> None:
    # reference: 26 PFNs in a one-range header message, 28 per body message
    assert (m.GPADL_HEADER_MAX_PFNS, m.GPADL_BODY_MAX_PFNS) == (26, 28)
    hdr = m.GpadlHeader(3, 0xE1E10, 8 + 8 * 40, 1, 40 * 4096, 0, tuple(range(1, 27)))
    assert len(hdr.pack()) == 20 + 8 + 26 * 8 <= m.MAX_MESSAGE_SIZE
    assert 20 + 8 + 27 * 8 > m.MAX_MESSAGE_SIZE
    back = m.GpadlHeader.unpack(hdr.pack())
    assert back.pfns == tuple(range(1, 27)) and back.range_buflen == 328


def test_short_and_long_messages_rejected() -> None:
    with pytest.raises(m.MessageError):
        m.OfferChannel.unpack(b"\x01\0\0\0" + bytes(100))
    with pytest.raises(m.MessageError):
        m.GpadlBody.unpack(bytes(16 + 8 * 29))     # 248 bytes > 240
    with pytest.raises(m.MessageError):
        m.message_type(b"\x01")


def test_versions() -> None:
    assert m.Version.parse("5.3") is m.Version.WIN10_V5_3
    assert m.Version.WIN8.text == "2.4"
    with pytest.raises(ValueError, match="unknown VMBus version"):
        m.Version.parse("9.9")
    assert list(m.KNOWN_VERSIONS) == sorted(m.KNOWN_VERSIONS, reverse=True)
