"""What the machine is doing: CPU pinning, RSS, load, and the CPU other people's work takes.

Numbers taken on a shared machine mean little without the background they were taken against,
so every measurement carries the 1-minute load average and the share of CPU that processes
outside this benchmark's own process tree used meanwhile ("foreign CPU").
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuPlan:
    """Which cores the load generator and the servers use."""

    load_cpus: set[int] | None  # None: no pinning (a single core)
    server_cpus: set[int] | None

    @classmethod
    def detect(cls) -> CpuPlan:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)
        return cls({cpus[0]}, {cpus[1]})

    def pin_servers_here(self) -> None:
        """Pin this process, so every server it starts from now on inherits the server core."""
        if self.server_cpus is not None:
            os.sched_setaffinity(0, self.server_cpus)

    def load_prefix(self) -> list[str]:
        """``taskset -c N`` for the load generator, or nothing."""
        if self.load_cpus is None:
            return []
        return ["taskset", "-c", ",".join(str(c) for c in sorted(self.load_cpus))]

    def describe(self) -> str:
        if self.load_cpus is None:
            return f"{os.cpu_count()} core(s): no pinning"
        return (
            f"{os.cpu_count()} cores: load generator on CPU {min(self.load_cpus)}, "
            f"all servers on CPU {min(self.server_cpus or {0})}"
        )


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class RssSampler:
    """Samples a process's RSS in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._pid = pid
        self._interval = interval
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, rss_bytes(self._pid))
            except (OSError, RuntimeError):
                return

    def reset(self) -> int:
        self.peak = rss_bytes(self._pid)
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class TreeRssSampler:
    """Samples the summed RSS of process trees (nginx's workers, a server's children) in a
    thread; ``peak`` is the highest sum seen."""

    def __init__(self, pids: tuple[int, ...], interval: float = 0.2) -> None:
        self._pids = pids
        self._interval = interval
        self.peak = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        parents, _ = _process_table()
        total = 0
        for pid in {member for root in self._pids for member in _tree(root, parents)}:
            with contextlib.suppress(OSError, RuntimeError):
                total += rss_bytes(pid)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._sample())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.peak = max(self.peak, self._sample())


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _process_table() -> tuple[dict[int, int], dict[int, int]]:
    """(parent of each pid, utime + stime jiffies of each pid) from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(rest[1])
        times[pid] = int(rest[11]) + int(rest[12])  # utime + stime
    return parents, times


def _tree(root: int, parents: dict[int, int]) -> set[int]:
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and its live descendants (e.g. nginx's workers)."""
    parents, times = _process_table()
    return sum(times.get(p, 0) for p in _tree(pid, parents)) / _CLK_TCK


def _our_jiffies() -> int:
    """CPU jiffies of this process, its live descendants, and its reaped children."""
    parents, times = _process_table()
    ours = _tree(os.getpid(), parents)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = round((children.ru_utime + children.ru_stime) * _CLK_TCK)
    return sum(times.get(pid, 0) for pid in ours) + reaped


class ForeignCpu:
    """Share of the machine's CPU used by processes outside this benchmark between two marks
    (in percent of one core)."""

    def __init__(self) -> None:
        self._start = self._mark()

    @staticmethod
    def _mark() -> tuple[float, int, int]:
        busy, _ = _busy_jiffies()
        return time.monotonic(), busy, _our_jiffies()

    def restart(self) -> None:
        self._start = self._mark()

    def percent(self) -> float:
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._mark()
        elapsed = max(t1 - t0, 1e-6)
        foreign = max(0, (busy1 - busy0) - (ours1 - ours0))
        return 100.0 * foreign / _CLK_TCK / elapsed


def mib(value: int) -> float:
    return value / (1024 * 1024)
