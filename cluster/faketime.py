"""One node's wall clock, moved at runtime with libfaketime (the chaos rig's clock jumps).

A process started with :func:`faketime_env` has ``libfaketime.so.1`` preloaded (from the
``libfaketime`` wheel, which bundles a Linux build). Its ``CLOCK_REALTIME`` (``time.time()``,
``datetime.now()``) is the real time plus the offset written in its own offset file, re-read
on every call (``FAKETIME_NO_CACHE``: about 10 us a call), so :func:`set_offset` moves it at
once. ``CLOCK_MONOTONIC`` stays real (``FAKETIME_DONT_FAKE_MONOTONIC``): Trio, SWIM and every
timeout keep the machine's one monotonic clock, so only what reads the wall clock sees the
jump. The node's workers inherit the environment, and so the clock.

:func:`faketime_unavailable` says why this cannot work here ("" when it can): it runs a
probe process under the library and checks that its wall clock moved and its monotonic
clock did not, rather than trusting that the library exists.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY = "libfaketime.so.1"


def library_path() -> Path | None:
    """The wheel's prebuilt ``libfaketime.so.1``, without importing the package (its
    ``__init__`` imports dateutil and pytz, which the library itself does not need)."""
    spec = importlib.util.find_spec("libfaketime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "vendor" / "libfaketime" / "src" / LIBRARY
        if path.exists():
            return path
    return None


def faketime_env(offset_file: Path) -> dict[str, str]:
    """The environment that gives a process the wall clock of ``offset_file``."""
    library = library_path()
    assert library is not None, "libfaketime is not installed"
    preload = os.environ.get("LD_PRELOAD")
    return {
        "LD_PRELOAD": f"{library}:{preload}" if preload else str(library),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",  # re-read the file on every call: a jump is seen at once
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "DONT_FAKE_MONOTONIC": "1",  # the older spelling, read by older builds
    }


def set_offset(offset_file: Path, seconds: int) -> None:
    """Move the wall clock of every process reading ``offset_file`` to real + ``seconds``.

    Written whole (a temporary file, then a rename), so a reader never sees half a line.
    """
    tmp = offset_file.with_name(offset_file.name + ".tmp")
    tmp.write_text(f"{seconds:+d}\n")
    os.replace(tmp, offset_file)


_PROBE = (
    "import time, sys\n"
    "w, m = time.time(), time.monotonic()\n"
    "open(sys.argv[1] + '.tmp', 'w').write('-3h\\n')\n"
    "import os; os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "print(time.time() - w, time.monotonic() - m)\n"
)


@functools.cache
def faketime_unavailable() -> str:
    """Why no process's clock can be moved here; "" when a probe saw it move."""
    if not sys.platform.startswith("linux"):
        return f"libfaketime's bundled library is for Linux; this is {sys.platform}"
    if library_path() is None:
        return "libfaketime is not installed (pip install libfaketime==3.0.1, in the test extra)"
    with tempfile.TemporaryDirectory(prefix="scatter-faketime-") as tmp:
        offset_file = Path(tmp) / "offset"
        set_offset(offset_file, 0)
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _PROBE, str(offset_file)],
                env=dict(os.environ, **faketime_env(offset_file)),
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            return "a probe process under libfaketime did not finish in 30 s"
        try:
            wall, monotonic = (float(x) for x in probe.stdout.split())
        except ValueError:
            return f"a probe process under libfaketime failed: {probe.stderr.strip()[-300:]}"
    if not -3 * 3600 - 60 < wall < -3 * 3600 + 60 or not 0 <= monotonic < 60:
        return (
            f"libfaketime loaded but did not move the clock as asked (-3 h): the wall clock "
            f"moved {wall:.0f} s, the monotonic clock {monotonic:.0f} s"
        )
    return ""
