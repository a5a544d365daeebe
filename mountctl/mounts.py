"""What is mounted where, read from /proc/self/mountinfo."""

from __future__ import annotations

import os

__all__ = ["mount_fstype", "unescape"]


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(path: str) -> str | None:
    """The fstype mounted exactly at ``path`` (the topmost one), or None."""
    target = os.path.realpath(path)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and unescape(fields[4]) == target:
                    found = right.split()[0]
    except OSError:
        return None
    return found
