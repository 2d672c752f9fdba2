"""mrrt-gateway: session cookies in, correctly-audienced bearer tokens out."""

from __future__ import annotations

from .app import create_app as create_app
from .settings import Settings as Settings
from .settings import load_settings as load_settings
from .version import __version__ as __version__

__all__ = ["Settings", "__version__", "create_app", "load_settings"]
