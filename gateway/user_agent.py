"""The browser family of a ``User-Agent`` header, for the session admin's list. Pure.

A session keeps this short name from a fixed list, never the header itself: the full string
fingerprints a user, and an operator only needs to tell "the phone" from "the laptop".
"""

from __future__ import annotations

# Checked in order: Edge and Opera also say "Chrome", Chrome also says "Safari".
_FAMILIES = (
    ("edg/", "Edge"),
    ("opr/", "Opera"),
    ("firefox/", "Firefox"),
    ("chrome/", "Chrome"),
    ("chromium/", "Chrome"),
    ("safari/", "Safari"),
    ("curl/", "curl"),
    ("python-httpx/", "httpx"),
    ("python-requests/", "requests"),
)
_MOBILE = ("mobile", "android", "iphone", "ipad")


def user_agent_family(header: str | None) -> str:
    """``Firefox``, ``Chrome (mobile)``, ``curl``..., or ``other``."""
    if not header:
        return "other"
    lowered = header[:512].lower()
    for marker, family in _FAMILIES:
        if marker in lowered:
            if family in ("Edge", "Opera", "Firefox", "Chrome", "Safari") and any(
                m in lowered for m in _MOBILE
            ):
                return f"{family} (mobile)"
            return family
    return "other"
