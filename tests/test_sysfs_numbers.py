"""The number parsing sysfs stores share (``kstrtoul``/``kstrtoint`` of lib/kstrtox.c),
fuzzed against the C library's ``strtoull``/``strtoll`` under the documented differences:
kstrtox takes no leading white space, at most one trailing newline and nothing else after
the number, and a ``-`` only where the type is signed (then no ``+`` after it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbusfs.sysfs.driver_core import kstrtoint, kstrtoul

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.strtoull.restype = ctypes.c_ulonglong
_libc.strtoull.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
_libc.strtoll.restype = ctypes.c_longlong
_libc.strtoll.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]


def _c(text: str, signed: bool) -> int:
    """What the kernel answers, from libc: the value, or -errno."""
    raw = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
    if not raw or raw[:1].isspace() or (raw[:1] == b"-" and not signed) \
            or raw[:2] in (b"-+", b"--") or (raw[:1] == b"+" and raw[1:2] in (b"+", b"-")):
        return -errno.EINVAL
    buf = ctypes.create_string_buffer(raw)
    end = ctypes.c_char_p()
    ctypes.set_errno(0)
    value = (_libc.strtoll if signed else _libc.strtoull)(buf, ctypes.byref(end), 0)
    err = ctypes.get_errno()
    assert end.value is not None
    consumed = len(raw) - len(end.value)
    if consumed == 0 or raw[consumed:] not in (b"", b"\n"):
        return -errno.EINVAL
    if err == errno.ERANGE or (signed and not -(1 << 31) <= value < 1 << 31):
        return -errno.ERANGE
    return int(value)


def _ours(parse: object, text: str) -> int:
    try:
        return parse(text)  # type: ignore[operator, no-any-return]
    except OSError as e:
        assert e.errno in (errno.EINVAL, errno.ERANGE), e
        return -e.errno


NUMBERISH = st.text(alphabet="0123456789abcdefxX+-\n \t\0", max_size=24)
LONG = st.integers(0, 1 << 70).flatmap(lambda n: st.sampled_from(
    [str(n), hex(n), f"0{n:o}", f"+{n}", f"{n}\n", f"-{n}"]))
CASES = settings(max_examples=5000, deadline=None)


@CASES
@given(st.one_of(NUMBERISH, LONG, st.text(max_size=12)))
def test_kstrtoul_answers_as_the_kernel(text: str) -> None:
    assert _ours(kstrtoul, text) == _c(text, signed=False)


@CASES
@given(st.one_of(NUMBERISH, LONG, st.text(max_size=12)))
def test_kstrtoint_answers_as_the_kernel(text: str) -> None:
    assert _ours(kstrtoint, text) == _c(text, signed=True)


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), ("1\n", 1), ("+7", 7), ("0x1F", 31), ("010", 8), ("0", 0), ("1\0junk", 1)])
def test_kstrtoul_examples(text: str, value: int) -> None:
    assert kstrtoul(text) == value


@pytest.mark.parametrize("text", ["", "\n", " 1", "1 ", "1\n\n", "-1", "0x", "08", "1_0",
                                  "0b1", "++1", "yes"])
def test_kstrtoul_refuses(text: str) -> None:
    with pytest.raises(OSError) as e:
        kstrtoul(text)
    assert e.value.errno == errno.EINVAL
