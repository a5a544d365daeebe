"""What can be known about a machine's images before anything is mounted, reported as config
errors naming the key: an existing image that cannot be a disk (``<disk>.image``), a new
image larger than any file its filesystem can hold (``<disk>.size``).

The service checks the same when it opens the images (someone may change them in between);
this makes the common mistakes exit 2 with the key, instead of failing the start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from backends.storage.files import largest_file, size_problem, too_large
from vbusfs.config import Config, ConfigError

__all__ = ["check_images"]


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.is_dir():
            return p
    return Path("/")


def check_images(config: Config) -> None:
    for disk in config.disks():
        try:
            st = os.stat(disk.image)
        except FileNotFoundError:
            if disk.readonly:
                continue              # the service says a read-only disk needs its image
            where = _existing_ancestor(disk.image.parent)
            try:
                if not too_large(where, disk.size):
                    continue
                limit = largest_file(where)
            except OSError:
                continue              # cannot be tried here; creating it will say why
            raise ConfigError(f"{disk.key}.size", f"{disk.size} bytes is larger than any "
                              f"file the filesystem of {where} can hold (at most {limit} "
                              "bytes)") from None
        except OSError:
            continue                  # opening it will say why
        else:
            if stat.S_ISREG(st.st_mode):
                problem = size_problem(disk.image, st.st_size, disk.sector_size)
                if problem is not None:
                    raise ConfigError(f"{disk.key}.image", problem)
