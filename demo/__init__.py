"""The local demo: demo APIs, a static page and a launcher (not part of the gateway package)."""
