"""WebSockets: the handshake (checked and authorized before accept) and the relay."""

from __future__ import annotations

from .handshake import WebSocketEndpoint as WebSocketEndpoint

__all__ = ["WebSocketEndpoint"]
