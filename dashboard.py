"""The dashboard page (SPEC section 11).

One self-contained page (``dashboard.html`` beside this module: HTML, CSS
and JavaScript inline, no CDN) that polls ``/api/status`` and draws
everything client-side, so the server only ever hands out the same bytes.
"""

from __future__ import annotations

from pathlib import Path

PAGE_PATH = Path(__file__).with_name("dashboard.html")


def render_page() -> bytes:
    """The dashboard page as served at ``GET /``."""
    return PAGE_PATH.read_bytes()
