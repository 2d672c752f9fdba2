"""Session stores: one contract (base.SessionStore), one implementation per backend."""

from __future__ import annotations

from .base import CachedToken, Session, SessionStore
from .memory import MemorySessionStore

__all__ = ["CachedToken", "MemorySessionStore", "Session", "SessionStore"]
