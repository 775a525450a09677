"""The dashboard page (SPEC section 11).

One self-contained page, no CDN: ``dashboard.html`` with its script
``dashboard.js`` and style ``dashboard.css`` beside this module. The page
polls ``/api/status`` and draws everything client-side, so the server only
ever hands out the same bytes. There is no inline script or style (the
page's Content-Security-Policy allows only these files).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
FILES = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def assets() -> dict[str, tuple[str, bytes]]:
    """The page and its files as served: URL path → (content type, bytes), read once."""
    return {path: (content_type, (HERE / name).read_bytes()) for path, (name, content_type) in FILES.items()}
