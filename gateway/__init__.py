"""mrrt-gateway: session cookies in, correctly-audienced bearer tokens out."""

from __future__ import annotations

__version__ = "0.1.0"
