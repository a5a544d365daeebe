"""The guest's KVP service with hv_kvp_daemon (reference/hv-services.md §2.4): host requests
laid out by hand at the reference's payload offsets, answers checked byte for byte, and the
pool files checked against the daemon's record layout (512-byte key + 2048-byte value,
UTF-8, NUL-terminated, back to back)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.conftest import Logs
from vbusfs.drivers.vmbus.hv_kvp import KvpService
from vbusfs.drivers.vmbus.kvp_daemon import KvpDaemon, OsIdentity, os_identity
from vbusfs.drivers.vmbus.util_service import HvUtilsPlatform
from vbusfs.protocols.vmbus.hv_kvp import utf8s_to_utf16s, utf16s_to_utf8s
from vbusfs.sysfs import DataFile, Tree

# reference §2.4 / §1.6
GET, SET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO = range(6)
REG_SZ, REG_U32, REG_U64, REG_QWORD = 1, 4, 8, 11
S_OK, E_FAIL, S_CONT, GUID_NOTFOUND = 0, 0x80004005, 0x80070103, 0x80041002
STATUS, FLAGS = 20, 25
IDENT = OsIdentity("Debian GNU/Linux", "12", "", "6.1.0", "6.1.0-18-amd64", "x86_64")
AUTO = [("FullyQualifiedDomainName", "guest.example.net"), ("IntegrationServicesVersion", "3.1"),
        ("NetworkAddressIPv4", ""), ("NetworkAddressIPv6", ""),
        ("OSBuildNumber", "6.1.0-18-amd64"), ("OSName", "Debian GNU/Linux"),
        ("OSMajorVersion", "12"), ("OSMinorVersion", ""), ("OSVersion", "6.1.0"),
        ("ProcessorArchitecture", "x86_64")]


def u16(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def ic(body: bytes) -> bytes:
    """pipe header + icmsg_hdr (type 2 KVPEXCHANGE, flags 0x03) + body (§1.2–1.3)."""
    hdr = struct.pack("<HHHHHHIBBxx", 3, 0, 2, 4, 0, len(body), 0, 0, 3)
    return struct.pack("<II", 1, 20 + len(body)) + hdr + body


def getset(op: int, pool: int, key: bytes, value: bytes = b"", vtype: int = 0,
           key_size: int | None = None, value_size: int | None = None) -> bytes:
    """op @28, pool @29, value_type @32, key_size @36, value_size @40, key @44, value @556;
    the 2580-byte body openvmm sends."""
    body = bytearray(2580)
    struct.pack_into("<BBxxIII", body, 0, op, pool, vtype,
                     len(key) if key_size is None else key_size,
                     len(value) if value_size is None else value_size)
    body[16:16 + len(key)] = key
    body[528:528 + len(value)] = value
    return ic(bytes(body))


def enum(pool: int, index: int) -> bytes:
    """index @32, value_type @36, key_size @40, value_size @44, key @48, value @560."""
    body = bytearray(2580)
    struct.pack_into("<BBxxI", body, 0, ENUMERATE, pool, index)
    return ic(bytes(body))


def delete(pool: int, key: bytes, key_size: int | None = None) -> bytes:
    """key_size @32, key @36."""
    body = bytearray(2580)
    struct.pack_into("<BBxxI", body, 0, DELETE, pool, len(key) if key_size is None else key_size)
    body[8:8 + len(key)] = key
    return ic(bytes(body))


def record(key: bytes, value: bytes) -> bytes:
    return key.ljust(512, b"\0") + value.ljust(2048, b"\0")


@pytest.fixture
def kvp() -> tuple[KvpService, Tree]:
    tree = Tree()
    svc = KvpService("kvp", HvUtilsPlatform())
    svc.daemon = KvpDaemon(IDENT, fqdn="guest.example.net")
    svc.daemon.attach(tree.root)
    return svc, tree


def pool_file(tree: Tree, n: int) -> DataFile:
    node = tree.resolve(f"var/lib/hyperv/.kvp_pool_{n}")
    assert isinstance(node, DataFile)
    return node


def status(reply: bytearray | None) -> int:
    assert reply is not None
    return int(struct.unpack_from("<I", reply, STATUS)[0])


def answered(svc: KvpService, req: bytes) -> bytearray:
    reply = svc.answer(req)
    assert reply is not None and len(reply) == len(req) and reply[FLAGS] == 0x05
    return reply


def enum_item(reply: bytearray) -> tuple[int, str, str]:
    vtype, ks, vs = struct.unpack_from("<III", reply, 36)
    return vtype, reply[48:48 + ks - 2].decode("utf-16-le"), \
        reply[560:560 + vs - 2].decode("utf-16-le")


# -- pool files ----------------------------------------------------------------------------------

def test_pool_files_exist_with_the_daemons_modes(kvp: tuple[KvpService, Tree]) -> None:
    _, tree = kvp
    d = tree.resolve("var/lib/hyperv")
    assert d.mode & 0o777 == 0o755
    for n in range(5):
        f = pool_file(tree, n)
        assert f.mode & 0o777 == 0o644 and f.size() == 0


def test_set_writes_a_record(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    req = getset(SET, 0, u16("Greeting"), u16("héllo wörld"), REG_SZ)
    reply = answered(svc, req)
    assert status(reply) == S_OK
    expect = bytearray(req)
    expect[FLAGS] = 0x05
    assert reply == expect                            # SET: only status and flags change
    assert bytes(pool_file(tree, 0).data) == record(b"Greeting", "héllo wörld".encode())


def test_set_again_overwrites_only_the_new_value_bytes(kvp: tuple[KvpService, Tree]) -> None:
    # kvp_key_add_or_modify memcpy's value_size bytes (the NUL included) over the old value
    svc, tree = kvp
    answered(svc, getset(SET, 1, u16("k"), u16("longvalue"), REG_SZ))
    answered(svc, getset(SET, 1, u16("k"), u16("ab"), REG_SZ))
    assert bytes(pool_file(tree, 1).data) == record(b"k", b"ab\0gvalue")
    assert len(pool_file(tree, 1).data) == 2560


@pytest.mark.parametrize("vtype,value,stored", [
    (REG_U32, struct.pack("<I", 4294967295), b"4294967295"),       # "%u"
    (REG_U64, struct.pack("<Q", 2**64 - 1), b"18446744073709551615"),  # "%llu"
])
def test_numbers_stored_as_text(kvp: tuple[KvpService, Tree], vtype: int, value: bytes,
                                stored: bytes) -> None:
    svc, tree = kvp
    assert status(answered(svc, getset(SET, 0, u16("n"), value, vtype))) == S_OK
    assert bytes(pool_file(tree, 0).data) == record(b"n", stored)


def test_qword_as_windows_sends_it_is_not_converted(kvp: tuple[KvpService, Tree]) -> None:
    # REG_QWORD (11) is not in Linux's switch: value_size stays 0, nothing is copied
    svc, tree = kvp
    assert status(answered(svc, getset(SET, 0, u16("q"), struct.pack("<Q", 7), REG_QWORD))) \
        == S_OK
    assert bytes(pool_file(tree, 0).data) == record(b"q", b"")
    answered(svc, getset(SET, 0, u16("s"), u16("kept"), REG_SZ))
    answered(svc, getset(SET, 0, u16("s"), struct.pack("<Q", 7), REG_QWORD))
    assert bytes(pool_file(tree, 0).data)[2560:] == record(b"s", b"kept")


def test_get_finds_the_key_but_answers_an_empty_value(kvp: tuple[KvpService, Tree]) -> None:
    # The kernel asks the daemon for value_size 0 bytes and reads the value back at the
    # ENUMERATE offset: an existing key answers S_OK, REG_SZ, value_size 2, an empty string.
    svc, _ = kvp
    answered(svc, getset(SET, 0, u16("k"), u16("a value longer than four bytes"), REG_SZ))
    req = getset(GET, 0, u16("k"))
    reply = answered(svc, req)
    assert status(reply) == S_OK
    assert struct.unpack_from("<III", reply, 32) == (REG_SZ, len(u16("k")), 2)
    assert reply[44:] == req[44:]                       # the key and value bytes untouched
    assert status(answered(svc, getset(GET, 0, u16("absent")))) == S_CONT


def test_delete_moves_later_records_up_with_strcpy(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    for k, v in (("a", "first-long-value"), ("b", "2"), ("c", "third")):
        answered(svc, getset(SET, 0, u16(k), u16(v), REG_SZ))
    reply = answered(svc, delete(0, u16("a")))
    assert status(reply) == S_OK
    # strcpy copies up to the NUL: the tail of the overwritten value stays behind it
    assert bytes(pool_file(tree, 0).data) == \
        record(b"b", b"2\0rst-long-value") + record(b"c", b"third")
    assert status(answered(svc, delete(0, u16("a")))) == S_CONT


def test_enumerate_a_pool(kvp: tuple[KvpService, Tree]) -> None:
    svc, _ = kvp
    answered(svc, getset(SET, 1, u16("Role"), u16("web"), REG_SZ))
    reply = answered(svc, enum(1, 0))
    assert status(reply) == S_OK and enum_item(reply) == (REG_SZ, "Role", "web")
    assert status(answered(svc, enum(1, 1))) == S_CONT
    assert status(answered(svc, enum(1, 0x80000000))) == S_CONT


def test_auto_pool(kvp: tuple[KvpService, Tree]) -> None:
    svc, _ = kvp
    for index, (key, value) in enumerate(AUTO):
        reply = answered(svc, enum(2, index))
        assert status(reply) == S_OK and enum_item(reply) == (REG_SZ, key, value)
    assert status(answered(svc, enum(2, 10))) == S_CONT


def test_ip_info_without_network_interfaces(kvp: tuple[KvpService, Tree]) -> None:
    svc, _ = kvp
    body = bytes([GET_IP_INFO, 0]) + bytes(7426)            # hv_kvp_ip_msg
    assert status(answered(svc, ic(body))) == E_FAIL         # no interface has the MAC
    body = bytes([SET_IP_INFO, 0]) + bytes(7426)
    assert status(answered(svc, ic(body))) == GUID_NOTFOUND  # none has the adapter GUID


def test_unknown_operation_is_answered_like_an_enumeration(kvp: tuple[KvpService, Tree]
                                                           ) -> None:
    # kvp_respond_to_host's default: an empty key and value, REG_SZ, S_OK
    svc, _ = kvp
    body = bytearray(2580)
    body[0] = 9
    reply = answered(svc, ic(bytes(body)))
    assert status(reply) == S_OK and struct.unpack_from("<III", reply, 36) == (REG_SZ, 2, 2)


def test_pool_out_of_range(kvp: tuple[KvpService, Tree], logs: Logs) -> None:
    logs.expect(r"KVP: pool 5 does not exist")
    svc, _ = kvp
    assert status(answered(svc, getset(SET, 5, u16("k"), u16("v"), REG_SZ))) == E_FAIL


def test_sizes_the_kernel_trusts(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    # key_size counts bytes, but the kernel converts that many UTF-16 *units*, stopping at
    # the NUL: a key_size larger than the key changes nothing
    answered(svc, getset(SET, 0, u16("key"), u16("v"), REG_SZ, key_size=500))
    assert bytes(pool_file(tree, 0).data)[:4] == b"key\0"
    # a key_size of 2 (one UTF-16 unit in bytes) converts two units: "ke"
    answered(svc, getset(SET, 3, u16("key"), u16("v"), REG_SZ, key_size=2))
    assert bytes(pool_file(tree, 3).data)[:3] == b"ke\0"
    # a negative int (as the kernel reads it) converts nothing: an empty value
    answered(svc, getset(SET, 4, u16("x"), u16("v"), REG_SZ, value_size=0x80000000))
    assert bytes(pool_file(tree, 4).data) == record(b"x", b"")


def test_keys_and_values_are_truncated_as_linux_does(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    key = "k" * 600
    answered(svc, getset(SET, 0, key.encode("utf-16-le")[:510] + b"\0\0", u16("v"), REG_SZ,
                         key_size=2000))
    # utf16s_to_utf8s stops at 511 bytes of output (HV_KVP_EXCHANGE_MAX_KEY_SIZE - 1)
    data = bytes(pool_file(tree, 0).data)
    assert data[:255] == b"k" * 255 and data[255] == 0


# -- what users write into the pool files ------------------------------------------------------

def test_a_user_record_is_seen_and_a_partial_one_ignored(kvp: tuple[KvpService, Tree]
                                                         ) -> None:
    svc, tree = kvp
    f = pool_file(tree, 1)
    f.write(0, record(b"From", b"guest") + b"partial")
    reply = answered(svc, enum(1, 0))
    assert enum_item(reply) == (REG_SZ, "From", "guest")
    assert status(answered(svc, enum(1, 1))) == S_CONT
    answered(svc, getset(SET, 1, u16("Next"), u16("x"), REG_SZ))
    # the daemon rewrites whole records: the partial one is gone
    assert bytes(f.data) == record(b"From", b"guest") + record(b"Next", b"x")


def test_a_key_without_nul_runs_into_its_value(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    pool_file(tree, 1).write(0, b"K" * 512 + b"V" * 10 + bytes(2038))
    _, key, value = enum_item(answered(svc, enum(1, 0)))
    # strlen runs on into the value; the kernel keeps at most 254 UTF-16 units of the key
    assert key == "K" * 254 and value == "V" * 10


def test_invalid_utf8_in_a_pool_is_a_failure(kvp: tuple[KvpService, Tree]) -> None:
    svc, tree = kvp
    pool_file(tree, 1).write(0, record(b"bad\xff", b"v"))
    assert status(answered(svc, enum(1, 0))) == E_FAIL


def test_pool_file_size_is_bounded() -> None:
    tree = Tree()
    d = KvpDaemon(IDENT)
    d.attach(tree.root)
    f = tree.resolve("var/lib/hyperv/.kvp_pool_0")
    assert isinstance(f, DataFile)
    with pytest.raises(OSError):
        f.write(f.max_size - 1, b"xx")


# -- the conversions (fs/nls/nls_base.c) -------------------------------------------------------

def test_utf16_to_utf8() -> None:
    assert utf16s_to_utf8s("aé€".encode("utf-16-le") + b"\0\0x\0", 100, 100) == \
        "aé€".encode()
    assert utf16s_to_utf8s("😀".encode("utf-16-le"), 2, 100) == "😀".encode()   # a pair
    assert utf16s_to_utf8s("😀".encode("utf-16-le"), 1, 100) == b""             # cut pair
    assert utf16s_to_utf8s(b"\x00\xdcA\x00", 4, 100) == b"A"          # lone low: skipped
    assert utf16s_to_utf8s(b"\x00\xdc\x00\xdcA\x00", 6, 100) == b"A"  # two lows: both
    assert utf16s_to_utf8s(b"\x00\xd8A\x00", 4, 100) == b"A"          # lone high: skipped
    assert utf16s_to_utf8s("é€a".encode("utf-16-le"), 10, 1) == b"a"  # too big: skipped
    assert utf16s_to_utf8s(b"a\0b\0", 0, 10) == b""                   # inlen 0
    assert utf16s_to_utf8s(b"a\0b\0", -5, 10) == b""                  # a negative inlen


def test_utf8_to_utf16() -> None:
    assert utf8s_to_utf16s("aé😀".encode(), 10) == ("aé😀".encode("utf-16-le"), 4)
    assert utf8s_to_utf16s(b"ab\0cd", 10) == ("ab".encode("utf-16-le"), 2)
    assert utf8s_to_utf16s("😀".encode(), 1) == (b"", 0)             # no room for a pair
    assert utf8s_to_utf16s(b"ab\xffcd", 10) == ("ab".encode("utf-16-le"), -22)   # -EINVAL
    assert utf8s_to_utf16s(b"ab\xffcd", 2) == ("ab".encode("utf-16-le"), 2)      # full first
    for bad in (b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"):
        assert utf8s_to_utf16s(bad, 10)[1] == -22


# -- the daemon's OS identity (kvp_get_os_info) ------------------------------------------------

def test_os_release_parsing(tmp_path: Path) -> None:
    p = tmp_path / "os-release"
    p.write_text('# comment\nNAME="Debian GNU/Linux"\nVERSION_ID=\'12\'\n'
                 'PRETTY_NAME="x \\"y\\""\nBROKEN\n')
    ident = os_identity(p)
    assert ident.os_name == "Debian GNU/Linux" and ident.os_major == "12"
    assert ident.os_minor == ""
    import os
    uts = os.uname()
    assert ident.os_build == uts.release and ident.processor_arch == uts.machine
    assert ident.os_version == uts.release.split("-")[0]
    assert os_identity(tmp_path / "absent").os_name == uts.sysname
