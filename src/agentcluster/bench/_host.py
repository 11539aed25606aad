"""How contended the CPUs were while a bench ran, to read its tails against.

Theory of operation: Linux's pressure-stall information (``/proc/pressure/cpu``, kernel 4.20+)
counts the microseconds during which at least one runnable task waited for a CPU ("some") --
the bench's own processes queueing for the machine's cores as much as anything else on it
(on this project's 2-vCPU VM it also reads 10-20 % while the guest is idle, which is the host
descheduling it). It does not see a virtual CPU that the host stops while a task runs on it,
so a low figure does not prove a quiet host; a high one explains a wide tail.
:class:`CpuPressure` reads the counter before and after a measured section and reports the
stalled share of the wall time in percent; None where the kernel does not provide it.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["CpuPressure", "read_cpu_stall_us"]

_PSI = Path("/proc/pressure/cpu")


def read_cpu_stall_us(path: Path = _PSI) -> int | None:
    """The cumulative "some" CPU stall in microseconds, or None when unavailable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                name, _, value = field.partition("=")
                if name == "total" and value.isdigit():
                    return int(value)
    return None


class CpuPressure:
    """``with CpuPressure() as p: ...`` then ``p.percent``: the share of the section's wall time
    during which some task waited for a CPU (None when the kernel has no PSI)."""

    def __init__(self, path: Path = _PSI) -> None:
        self._path = path
        self._start_us: int | None = None
        self._t0 = 0.0
        self.percent: float | None = None

    def __enter__(self) -> CpuPressure:
        self._start_us = read_cpu_stall_us(self._path)
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        end = read_cpu_stall_us(self._path)
        wall = time.monotonic() - self._t0
        if self._start_us is None or end is None or wall <= 0:
            self.percent = None
            return
        self.percent = round(100.0 * (end - self._start_us) / 1e6 / wall, 1)
