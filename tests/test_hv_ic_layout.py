"""IC message layouts compared with Debian's linux-libc-dev header, compiled here.

``/usr/include/linux/hyperv.h`` (uapi) holds what Linux shares with its user-space daemons:
the KVP message (which is also the wire format after the IC header), VSS and fcopy, the
status codes and operation numbers. The C program prints their sizes, offsets and values;
the Python definitions must agree. ``struct kvp_record`` is hv_kvp_daemon.c's own, declared
here from its two fields. ``icmsg_hdr`` and the heartbeat/shutdown/timesync bodies live in
the kernel-internal header, so they are checked against reference/hv-services.md §1.3 and
§2 instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vbusfs.protocols.vmbus import hv_ic, hv_kvp

HEADER = Path("/usr/include/linux/hyperv.h")

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/hyperv.h>
struct kvp_record {   /* tools/hv/hv_kvp_daemon.c */
    char key[HV_KVP_EXCHANGE_MAX_KEY_SIZE];
    char value[HV_KVP_EXCHANGE_MAX_VALUE_SIZE];
};
#define P(name, value) printf("%s %lu\n", name, (unsigned long)(value))
#define M(s, f) (offsetof(struct hv_kvp_msg, f))
int main(void) {
    P("kvp_hdr", sizeof(struct hv_kvp_hdr));
    P("exchg_value", sizeof(struct hv_kvp_exchg_msg_value));
    P("exchg_value.key_size", offsetof(struct hv_kvp_exchg_msg_value, key_size));
    P("exchg_value.value_size", offsetof(struct hv_kvp_exchg_msg_value, value_size));
    P("exchg_value.key", offsetof(struct hv_kvp_exchg_msg_value, key));
    P("exchg_value.value", offsetof(struct hv_kvp_exchg_msg_value, value));
    P("msg", sizeof(struct hv_kvp_msg));
    P("msg.set.value_type", M(s, body.kvp_set.data.value_type));
    P("msg.set.key_size", M(s, body.kvp_set.data.key_size));
    P("msg.set.value_size", M(s, body.kvp_set.data.value_size));
    P("msg.set.key", M(s, body.kvp_set.data.key));
    P("msg.set.value", M(s, body.kvp_set.data.value));
    P("msg.get.data", M(s, body.kvp_get.data));
    P("msg.enum.index", M(s, body.kvp_enum_data.index));
    P("msg.enum.data", M(s, body.kvp_enum_data.data));
    P("msg.enum.key_size", M(s, body.kvp_enum_data.data.key_size));
    P("msg.enum.value_size", M(s, body.kvp_enum_data.data.value_size));
    P("msg.enum.key", M(s, body.kvp_enum_data.data.key));
    P("msg.enum.value", M(s, body.kvp_enum_data.data.value));
    P("msg.delete.key_size", M(s, body.kvp_delete.key_size));
    P("msg.delete.key", M(s, body.kvp_delete.key));
    P("delete", sizeof(struct hv_kvp_msg_delete));
    P("enumerate", sizeof(struct hv_kvp_msg_enumerate));
    P("ip_msg", sizeof(struct hv_kvp_ip_msg));
    P("ip_msg.adapter_id", offsetof(struct hv_kvp_ip_msg, kvp_ip_val.adapter_id));
    P("kvp_record", sizeof(struct kvp_record));
    P("HV_KVP_EXCHANGE_MAX_KEY_SIZE", HV_KVP_EXCHANGE_MAX_KEY_SIZE);
    P("HV_KVP_EXCHANGE_MAX_VALUE_SIZE", HV_KVP_EXCHANGE_MAX_VALUE_SIZE);
    P("KVP_OP_GET", KVP_OP_GET); P("KVP_OP_SET", KVP_OP_SET);
    P("KVP_OP_DELETE", KVP_OP_DELETE); P("KVP_OP_ENUMERATE", KVP_OP_ENUMERATE);
    P("KVP_OP_GET_IP_INFO", KVP_OP_GET_IP_INFO); P("KVP_OP_SET_IP_INFO", KVP_OP_SET_IP_INFO);
    P("KVP_OP_REGISTER1", KVP_OP_REGISTER1);
    P("KVP_POOL_EXTERNAL", KVP_POOL_EXTERNAL); P("KVP_POOL_GUEST", KVP_POOL_GUEST);
    P("KVP_POOL_AUTO", KVP_POOL_AUTO); P("KVP_POOL_AUTO_EXTERNAL", KVP_POOL_AUTO_EXTERNAL);
    P("KVP_POOL_AUTO_INTERNAL", KVP_POOL_AUTO_INTERNAL); P("KVP_POOL_COUNT", KVP_POOL_COUNT);
    P("REG_SZ", REG_SZ); P("REG_U32", REG_U32); P("REG_U64", REG_U64);
    P("HV_S_OK", HV_S_OK); P("HV_E_FAIL", HV_E_FAIL); P("HV_S_CONT", HV_S_CONT);
    P("HV_ERROR_NOT_SUPPORTED", HV_ERROR_NOT_SUPPORTED);
    P("HV_ERROR_MACHINE_LOCKED", HV_ERROR_MACHINE_LOCKED);
    P("HV_ERROR_DEVICE_NOT_CONNECTED", HV_ERROR_DEVICE_NOT_CONNECTED);
    P("HV_INVALIDARG", HV_INVALIDARG); P("HV_GUID_NOTFOUND", HV_GUID_NOTFOUND);
    P("HV_ERROR_ALREADY_EXISTS", HV_ERROR_ALREADY_EXISTS);
    P("HV_ERROR_DISK_FULL", HV_ERROR_DISK_FULL);
    P("vss_msg", sizeof(struct hv_vss_msg));
    P("vss_msg.flags", offsetof(struct hv_vss_msg, vss_cf));
    P("VSS_OP_CREATE", VSS_OP_CREATE); P("VSS_OP_DELETE", VSS_OP_DELETE);
    P("VSS_OP_HOT_BACKUP", VSS_OP_HOT_BACKUP); P("VSS_OP_GET_DM_INFO", VSS_OP_GET_DM_INFO);
    P("VSS_OP_BU_COMPLETE", VSS_OP_BU_COMPLETE); P("VSS_OP_FREEZE", VSS_OP_FREEZE);
    P("VSS_OP_THAW", VSS_OP_THAW); P("VSS_OP_AUTO_RECOVER", VSS_OP_AUTO_RECOVER);
    P("VSS_HBU_NO_AUTO_RECOVERY", VSS_HBU_NO_AUTO_RECOVERY);
    P("fcopy_hdr", sizeof(struct hv_fcopy_hdr));
    P("start_fcopy", sizeof(struct hv_start_fcopy));
    P("start_fcopy.file_name", offsetof(struct hv_start_fcopy, file_name));
    P("start_fcopy.path_name", offsetof(struct hv_start_fcopy, path_name));
    P("start_fcopy.copy_flags", offsetof(struct hv_start_fcopy, copy_flags));
    P("start_fcopy.file_size", offsetof(struct hv_start_fcopy, file_size));
    P("do_fcopy", sizeof(struct hv_do_fcopy));
    P("do_fcopy.offset", offsetof(struct hv_do_fcopy, offset));
    P("do_fcopy.size", offsetof(struct hv_do_fcopy, size));
    P("do_fcopy.data", offsetof(struct hv_do_fcopy, data));
    P("START_FILE_COPY", START_FILE_COPY); P("WRITE_TO_FILE", WRITE_TO_FILE);
    P("COMPLETE_FCOPY", COMPLETE_FCOPY); P("CANCEL_FCOPY", CANCEL_FCOPY);
    P("OVER_WRITE", OVER_WRITE); P("CREATE_PATH", CREATE_PATH);
    P("W_MAX_PATH", W_MAX_PATH); P("DATA_FRAGMENT", DATA_FRAGMENT);
    P("UTIL_FW_VERSION", UTIL_FW_VERSION); P("UTIL_WS2K8_FW_VERSION", UTIL_WS2K8_FW_VERSION);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not HEADER.exists():
        pytest.fail(f"{HEADER} is missing: install linux-libc-dev (.ci/setup does)")
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc is not None, "no C compiler (.ci/setup installs gcc)"
    d = tmp_path_factory.mktemp("hvlayout")
    (d / "l.c").write_text(C_PROGRAM)
    subprocess.run([cc, "-o", str(d / "l"), str(d / "l.c")], check=True)
    out = subprocess.run([str(d / "l")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_kvp_message(c_values: dict[str, int]) -> None:
    c = c_values
    assert hv_kvp.KVP_HDR.size == c["kvp_hdr"]
    assert hv_kvp.EXCHG_VALUE.size == c["exchg_value"]
    assert hv_kvp.KVP_MSG_STRUCT_SIZE == c["msg"]
    assert hv_kvp.GETSET_DATA == c["msg.get.data"] == c["msg.set.value_type"]
    assert hv_kvp.MSG_GS_VALUE_TYPE == c["msg.set.value_type"]
    assert hv_kvp.MSG_GS_KEY_SIZE == c["msg.set.key_size"]
    assert hv_kvp.MSG_GS_VALUE_SIZE == c["msg.set.value_size"]
    assert hv_kvp.MSG_GS_KEY == c["msg.set.key"]
    assert hv_kvp.MSG_GS_VALUE == c["msg.set.value"]
    assert hv_kvp.ENUM_INDEX == c["msg.enum.index"]
    assert hv_kvp.ENUM_DATA == c["msg.enum.data"]
    assert hv_kvp.MSG_ENUM_KEY_SIZE == c["msg.enum.key_size"]
    assert hv_kvp.MSG_ENUM_VALUE_SIZE == c["msg.enum.value_size"]
    assert hv_kvp.MSG_ENUM_KEY == c["msg.enum.key"]
    assert hv_kvp.MSG_ENUM_VALUE == c["msg.enum.value"]
    assert hv_kvp.MSG_DELETE_KEY_SIZE == c["msg.delete.key_size"]
    assert hv_kvp.MSG_DELETE_KEY == c["msg.delete.key"]
    assert hv_kvp.DELETE_MSG.size == c["delete"]
    assert hv_kvp.IP_MSG_SIZE == c["ip_msg"]
    assert hv_kvp.IP_ADAPTER_ID == c["ip_msg.adapter_id"]
    assert hv_kvp.KVP_RECORD_SIZE == c["kvp_record"] == 2560         # reference §2.4
    # openvmm's body (2 + 2578) is the enumerate message with the header
    assert hv_kvp.KVP_MSG_SIZE == c["msg.enum.data"] + c["exchg_value"]


def test_kvp_constants(c_values: dict[str, int]) -> None:
    c = c_values
    assert hv_kvp.HV_KVP_EXCHANGE_MAX_KEY_SIZE == c["HV_KVP_EXCHANGE_MAX_KEY_SIZE"]
    assert hv_kvp.HV_KVP_EXCHANGE_MAX_VALUE_SIZE == c["HV_KVP_EXCHANGE_MAX_VALUE_SIZE"]
    for op in hv_kvp.KvpOp:
        assert op == c[f"KVP_OP_{op.name}"]
    for pool in hv_kvp.KvpPool:
        assert pool == c[f"KVP_POOL_{pool.name}"]
    assert hv_kvp.KVP_POOL_COUNT == c["KVP_POOL_COUNT"]
    assert hv_kvp.KVP_OP_REGISTER1 == c["KVP_OP_REGISTER1"]
    assert (hv_kvp.REG_SZ, hv_kvp.REG_U32, hv_kvp.REG_U64) == \
        (c["REG_SZ"], c["REG_U32"], c["REG_U64"])


def test_status_codes(c_values: dict[str, int]) -> None:
    for name in ("HV_S_OK", "HV_E_FAIL", "HV_S_CONT", "HV_ERROR_NOT_SUPPORTED",
                 "HV_ERROR_MACHINE_LOCKED", "HV_ERROR_DEVICE_NOT_CONNECTED", "HV_INVALIDARG",
                 "HV_GUID_NOTFOUND", "HV_ERROR_ALREADY_EXISTS", "HV_ERROR_DISK_FULL"):
        assert getattr(hv_ic, name) == c_values[name], name


def test_vss(c_values: dict[str, int]) -> None:
    c = c_values
    assert hv_ic.VSS_MSG.size == c["vss_msg"] == 12                  # reference §2.5
    assert c["vss_msg.flags"] == 8
    for name, value in hv_ic.VSS_OPS.items():
        assert value == c[f"VSS_OP_{name.upper()}"]
    assert hv_ic.VSS_HBU_NO_AUTO_RECOVERY == c["VSS_HBU_NO_AUTO_RECOVERY"]


def test_fcopy(c_values: dict[str, int]) -> None:
    c = c_values
    assert hv_ic.FCOPY_HDR.size == c["fcopy_hdr"] == 36              # reference §2.6
    assert hv_ic.FCOPY_START.size == c["start_fcopy"]
    assert (c["start_fcopy.file_name"], c["start_fcopy.path_name"], c["start_fcopy.copy_flags"],
            c["start_fcopy.file_size"]) == (36, 556, 1076, 1080)   # +28: reference §2.6
    # hv_do_fcopy has a u32 pad after the header, so offset/size/data are 4 bytes further
    # than reference §2.6 says (payload @68/@76/@80, not @64/@72/@76)
    assert hv_ic.FCOPY_WRITE.size == c["do_fcopy"]
    assert (c["do_fcopy.offset"], c["do_fcopy.size"], c["do_fcopy.data"]) == (40, 48, 52)
    pattern = (bytes(range(256)) * 25)[:hv_ic.FCOPY_WRITE.size]
    assert hv_ic.FCOPY_WRITE.unpack(pattern)[3] == 0x27262524                   # the pad @36
    for name, value in hv_ic.FCOPY_OPS.items():
        key = {"start": "START_FILE_COPY", "write": "WRITE_TO_FILE",
               "complete": "COMPLETE_FCOPY", "cancel": "CANCEL_FCOPY"}[name]
        assert value == c[key]
    assert (hv_ic.FCOPY_OVER_WRITE, hv_ic.FCOPY_CREATE_PATH) == (c["OVER_WRITE"],
                                                                 c["CREATE_PATH"])
    assert (hv_ic.W_MAX_PATH, hv_ic.DATA_FRAGMENT) == (c["W_MAX_PATH"], c["DATA_FRAGMENT"])


def test_framework_versions(c_values: dict[str, int]) -> None:
    from vbusfs.drivers.vmbus.util_service import SERVICE_VERSIONS
    fw = SERVICE_VERSIONS["heartbeat"][0]
    assert [(v[0] << 16) | v[1] for v in fw] == [c_values["UTIL_FW_VERSION"],
                                                  c_values["UTIL_WS2K8_FW_VERSION"]]


def test_kernel_internal_layouts_against_the_reference() -> None:
    # §1.2–1.3: pipe header 8, icmsg_hdr 20, body at 28, status @20, icflags @25
    assert (hv_ic.PIPE.size, hv_ic.HDR.size, hv_ic.ICMSG_HDR) == (8, 20, 28)
    assert (hv_ic.HDR_STATUS, hv_ic.HDR_FLAGS) == (20, 25)
    # §2.1 heartbeat_msg_data: seq_num @28, 40 bytes
    assert (hv_ic.HEARTBEAT_SEQ, hv_ic.HEARTBEAT_BODY) == (28, 40)
    # §2.2 shutdown_msg_data: 2060 bytes, flags @36 in the payload
    assert hv_ic.SHUTDOWN_BODY.size == 2060
    assert hv_ic.SHUTDOWN_BODY.pack(0, 0, 0xA5, b"")[8] == 0xA5
    # §2.3 ictimesync_data 25 B / openvmm 28 B; ictimesync_ref_data 22 B / openvmm 24 B
    assert (hv_ic.TIMESYNC_V1_LINUX_SIZE, hv_ic.TIMESYNC_V1.size) == (25, 28)
    assert (hv_ic.TIMESYNC_V4_LINUX_SIZE, hv_ic.TIMESYNC_V4.size) == (22, 24)
    assert hv_ic.TIMESYNC_V4.pack(1, 2, 0x5A, 0, 0)[16] == 0x5A     # flags @44
    assert hv_ic.TIMESYNC_V1.pack(1, 2, 3, 0x5A)[24] == 0x5A        # flags @52
    assert hv_ic.WLTIMEDELTA == 11644473600 * 10**7
