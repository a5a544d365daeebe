"""GUID text forms and VMBus modalias, checked against reference/sysfs.md §1.5."""

import uuid

import pytest

from vbusfs.protocols.guid import guid_braced, guid_modalias_hex, guid_text, parse_guid
from vbusfs.protocols.vmbus.messages import DEVICE_CLASSES, class_by_type

# (class_id as printed, modalias) copied from reference/sysfs.md table 1.5
REFERENCE = [
    ("{32412632-86cb-44a2-9b5c-50d1417354f5}", "vmbus:32264132cb86a2449b5c50d1417354f5"),
    ("{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}", "vmbus:d96361baa104294db60572e2ffb1dc7f"),
    ("{f8615163-df3e-46c5-913f-f2d2f965ed0e}", "vmbus:635161f83edfc546913ff2d2f965ed0e"),
    ("{44c4f61d-4444-4400-9d52-802e27ede19f}", "vmbus:1df6c444444400449d52802e27ede19f"),
    ("{da0a7802-e377-4aac-8e77-0558eb1073f8}", "vmbus:02780ada77e3ac4a8e770558eb1073f8"),
    ("{f912ad6d-2b17-48ea-bd65-f927a61c7684}", "vmbus:6dad12f9172bea48bd65f927a61c7684"),
    ("{cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a}", "vmbus:9eb6a8cf4a5bc04cb98b8ba1a1f3f95a"),
    ("{a9a0f4e7-5a45-4d96-b827-8a841e8c03e6}", "vmbus:e7f4a0a9455a964db8278a841e8c03e6"),
    ("{9527e630-d0ae-497b-adce-e80ab0175caf}", "vmbus:30e62795aed07b49adcee80ab0175caf"),
    ("{57164f39-9115-4e78-ab55-382f3bd5422d}", "vmbus:394f16571591784eab55382f3bd5422d"),
    ("{0e0b6031-5213-4934-818b-38d90ced39db}", "vmbus:31600b0e13523449818b38d90ced39db"),
    ("{34d14be3-dee4-41c8-9ae7-6b174977c192}", "vmbus:e34bd134e4dec8419ae76b174977c192"),
    ("{35fa2e29-ea23-4236-96ae-3a6ebacba440}", "vmbus:292efa3523ea364296ae3a6ebacba440"),
    ("{525074dc-8985-46e2-8057-a307dc18a502}", "vmbus:dc7450528589e2468057a307dc18a502"),
]


@pytest.mark.parametrize(("class_id", "modalias"), REFERENCE)
def test_modalias_matches_reference(class_id: str, modalias: str) -> None:
    g = parse_guid(class_id)
    assert guid_braced(g) == class_id
    assert "vmbus:" + guid_modalias_hex(g) == modalias


def test_modalias_is_byte_swapped_first_three_fields() -> None:
    # Independent derivation: swap the first three fields by hand.
    text = "f8615163-df3e-46c5-913f-f2d2f965ed0e"
    a, b, c, d, e = text.split("-")
    swapped = (bytes.fromhex(a)[::-1] + bytes.fromhex(b)[::-1] + bytes.fromhex(c)[::-1]
               + bytes.fromhex(d) + bytes.fromhex(e)).hex()
    assert guid_modalias_hex(uuid.UUID(text)) == swapped


def test_text_forms() -> None:
    g = parse_guid("{F8615163-DF3E-46C5-913F-F2D2F965ED0E}")
    assert guid_text(g) == "f8615163-df3e-46c5-913f-f2d2f965ed0e"
    assert parse_guid("f8615163-df3e-46c5-913f-f2d2f965ed0e") == g


@pytest.mark.parametrize("bad", ["", "xyz", "{f8615163-df3e-46c5-913f-f2d2f965ed0e",
                                 "f8615163df3e46c5913ff2d2f965ed0e",
                                 "f8615163-df3e-46c5-913f-f2d2f965ed0"])
def test_bad_guids_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="not a GUID"):
        parse_guid(bad)


def test_device_table_matches_reference() -> None:
    by_class = {c.guid: c for c in DEVICE_CLASSES}
    for class_id, _ in REFERENCE:
        assert parse_guid(class_id) in by_class
    # `device` attribute values from reference table 1.5
    expect = {"ide": 0x0, "scsi": 0x1, "nic": 0x3, "pcie": 0x5, "framebuffer": 0x6,
              "keyboard": 0x7, "mouse": 0x8, "kvp": 0x9, "timesync": 0xA, "heartbeat": 0xB,
              "shutdown": 0xC, "fcopy": 0xD, "vss": 0xE, "balloon": 0xF, "avma1": 0x10}
    for name, dev_type in expect.items():
        cls = class_by_type(name)
        assert cls is not None and cls.dev_type == dev_type, name
