"""The embedded default corpus: the running interpreter's standard-library Python source.

Every machine with Python has it, no one here wrote it, and it is real code: about 10 MB in ~600
``.py`` files once tests, IDLE, demos, ``site-packages`` and generated data are left out. Documents are
whole files; the held-out split (see :mod:`fastblt.data.splits`) hashes each file's path relative to
the stdlib root (``"email/parser.py"``), so whole modules are held out, and the choice does not depend
on the order in which the file system lists them.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from fastblt.config import ConfigError
from fastblt.data.sources import TextFileSource

# Directory names skipped anywhere below the stdlib root: tests, IDE, demos, third-party packages,
# caches, build configuration and generated documentation data.
SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "__pycache__",
        "pydoc_data",
        "lib-dynload",
    }
)


def stdlib_root() -> str:
    """The standard-library directory of the running interpreter (``sysconfig`` ``stdlib`` path)."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative POSIX paths (``"json/decoder.py"``) of the corpus files under ``root``."""
    root = root or stdlib_root()
    if not os.path.isdir(root):
        raise ConfigError(
            f"the standard-library directory {root} does not exist; set data.source to another corpus"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(("config-", "."))]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                path = name if rel == "." else os.path.join(rel, name)
                found.append(path.replace(os.sep, "/"))
    return sorted(found)


class StdlibSource(TextFileSource):
    """The stdlib corpus as a random-access source of file bytes; keys are the relative paths."""

    def __init__(self, root: str | None = None):
        root = root or stdlib_root()
        names = stdlib_files(root)
        if not names:
            raise ConfigError(
                f"no .py files under {root}; this Python ships without its library source: "
                "set data.source to another corpus"
            )
        paths = [os.path.join(root, *name.split("/")) for name in names]
        super().__init__(paths, names=names, label="stdlib", key="data.source='stdlib'")
        self._python = f"{sys.version_info.major}.{sys.version_info.minor}"

    def __repr__(self) -> str:
        return f"StdlibSource(python={self._python}, {super().__repr__()})"
