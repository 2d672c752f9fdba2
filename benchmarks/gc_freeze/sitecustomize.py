"""Benchmark variant only: ``gc.freeze()`` right before ``gateway run`` starts serving.

On ``PYTHONPATH`` (benchmarks/phases.py sets it for one gateway process), Python imports this
at startup; it wraps ``uvicorn.run`` so that every object built while importing and creating the
app moves to the permanent generation, out of reach of the cyclic GC's full collections (which
otherwise scan them all, ~60 ms each here: the gateway's p99). Not part of the gateway.
"""

from __future__ import annotations

import gc
from typing import Any

import uvicorn

_run = uvicorn.run


def _run_frozen(*args: Any, **kwargs: Any) -> None:
    gc.collect()
    gc.freeze()
    _run(*args, **kwargs)


uvicorn.run = _run_frozen
