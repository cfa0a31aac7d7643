"""Start the Keras backend without the start-up lines its native libraries write straight to stderr.

TensorFlow's C++ layer logs through Abseil before anything has set Abseil's
logging up, so `TF_CPP_MIN_LOG_LEVEL` does not reach those first lines: every
command would begin with the "All log messages before absl::InitializeLog()"
banner, oneDNN's notice and, on a machine without an NVIDIA GPU, a CUDA probe's
"failed call to cuInit" error (abseil-cpp issue 1570, pull requests 1718 and
1957). `start_backend` imports the backend (and TensorFlow, which the data
pipelines use on every backend) and lists the devices with file descriptor 2
sent to a temporary file; then it writes back every line but those: info and
warning lines of the native layer, the banner, and the CUDA probe's errors when
the machine has no NVIDIA device. Nothing else is hidden, and if the start
fails, everything captured is written back before the error rises.

Example:

>>> from transferkit.native_logs import start_backend
>>> start_backend()          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator

BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Abseil's line prefix: severity letter, MMDD, time, thread, file:line]
NATIVE_INFO = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] ")
CUDA_PROBE = re.compile(r"^E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ (cuda_\w+|cudart_stub)\.cc:\d+\] ")


def has_nvidia_device() -> bool:
    """Whether this machine shows an NVIDIA device node (`/dev/nvidia0`, ...): then a failed CUDA probe matters."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def is_start_up_noise(line: str, nvidia: bool | None = None) -> bool:
    """Whether `line` is a native start-up line that says nothing to the user (see the module's docstring)."""
    if line.strip() == BANNER or NATIVE_INFO.match(line):
        return True
    return bool(CUDA_PROBE.match(line)) and not (has_nvidia_device() if nvidia is None else nvidia)


@contextlib.contextmanager
def start_up_noise_hidden(enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file for the block, then write back what is not start-up noise.

    Python's own `sys.stderr` is flushed on the way in and out, so its lines keep
    their order. When the block raises, every captured line is written back.
    `enabled=False` (`--debug`) changes nothing.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = lines if failed else [line for line in lines if not is_start_up_noise(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def start_backend(quiet: bool = True) -> None:
    """Import Keras's backend and TensorFlow and list the devices, with the start-up noise hidden if `quiet`."""
    with start_up_noise_hidden(quiet):
        import keras  # noqa: F401 - imports the backend named by KERAS_BACKEND

        try:
            import tensorflow as tf
        except ImportError:  # a JAX-only install: no TensorFlow to start
            return
        tf.config.list_physical_devices()
