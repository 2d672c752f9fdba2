from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import allocator
from gateway.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# Rounds of 64 buffers of 256 KiB (a socket read's size), written to and freed: with glibc's
# defaults every round faults its 16 MiB in afresh; kept, only the first round does.
_ROUNDS = """
import resource, sys
from gateway.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "tuned" else "plain")
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [b"x" * (256 * 1024) for _ in range(64)]
    del buffers
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str, **env: str) -> tuple[str, list[int]]:
    """(what keep_freed_memory said, page faults of each round after the first)."""
    clean = {k: v for k, v in os.environ.items() if k not in allocator.OPERATOR_CHOICES}
    result = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, *rounds = result.stdout.split()
    return first, [int(n) for n in rounds[1:]]


glibc_only = pytest.mark.skipif(not allocator._is_glibc(), reason="the tuning is glibc's")


@glibc_only
def test_freed_buffers_are_reused_without_page_faults() -> None:
    said, plain = _page_faults("plain")
    assert said == "plain"
    assert min(plain) > 2000  # 16 MiB is 4,096 pages: the defaults give them back every round
    said, tuned = _page_faults("tuned")
    assert said == "True"
    assert max(tuned) < 100


@glibc_only
def test_the_operators_allocator_settings_stand() -> None:
    said, rounds = _page_faults("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert said == "False"
    assert min(rounds) > 2000  # their small trim threshold, not ours


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ],
)
def test_an_allocator_the_operator_chose_is_left_alone(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for other in allocator.OPERATOR_CHOICES:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    asked: list[str] = []

    def is_glibc() -> bool:
        asked.append("libc")
        return True

    monkeypatch.setattr(allocator, "_is_glibc", is_glibc)
    assert keep_freed_memory() is False
    assert asked == []  # decided before the C library is even asked


def test_unrelated_glibc_tunables_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    for other in allocator.OPERATOR_CHOICES:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert allocator._operator_chose() is False


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in allocator.OPERATOR_CHOICES:
        monkeypatch.delenv(name, raising=False)

    def unknown_name(name: str) -> str:
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", unknown_name)  # musl, macOS
    assert keep_freed_memory() is False
