"""Files the gateway serves over plain HTTP: ``/wirehub.js`` and the
``/dashboard`` page with its script and style sheet.

Each file is read once, from the installed package, when the gateway is
built; its ETag is a hash of its bytes, so a browser revalidates
(``Cache-Control: no-cache``) and gets a body-less ``304`` while the file is
unchanged, and a new wirehub release is never hidden behind a stale copy.

The client is public code that pages on any origin may import (CORS). The
dashboard is a page of the gateway's own origin: its Content-Security-Policy
lets it load scripts and styles and open WebSockets only there (no inline
script, no other host), it may not be framed (its buttons stop containers),
and it sends no ``Referer`` (its URL may carry ``?token=`` until the script
removes it). The page learns the WebSocket path (``ws_path``) from an
attribute of its ``<html>`` element, filled in here.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

from picows import WSUpgradeResponse

STATIC_PACKAGE = "wirehub.static"
JS, CSS, HTML = "text/javascript; charset=utf-8", "text/css; charset=utf-8", "text/html; charset=utf-8"
# A module script is fetched in CORS mode: pages on another origin may load
# the client (it is public code; no credentials).
PUBLIC = {"Access-Control-Allow-Origin": "*"}
PAGE = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# path -> (file in wirehub/static, content type, headers of its own)
ROUTES: dict[str, tuple[str, str, dict[str, str]]] = {
    "/wirehub.js": ("wirehub.js", JS, PUBLIC),
    "/dashboard": ("dashboard.html", HTML, PAGE),
    "/dashboard/app.js": ("dashboard.js", JS, {}),
    "/dashboard/style.css": ("dashboard.css", CSS, {}),
}
WS_PATH_ATTRIBUTE = b'data-ws-path="/ws"'  # in dashboard.html, as shipped


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str
    headers: dict[str, str]

    @classmethod
    def load(cls, name: str, content_type: str, headers: dict[str, str] | None = None,
             replace: dict[bytes, bytes] | None = None) -> StaticFile:
        body = resources.files(STATIC_PACKAGE).joinpath(name).read_bytes()
        for old, new in (replace or {}).items():
            body = body.replace(old, new)
        return cls(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', headers or {})

    def response(self, if_none_match: str | None) -> Any:
        """200 with the body, or 304 when the request names the current ETag."""
        headers = {
            "Content-Type": self.content_type,
            "ETag": self.etag,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            **self.headers,
        }
        if if_none_match is not None and self.etag in (tag.strip() for tag in if_none_match.split(",")):
            response = WSUpgradeResponse.create_ok_response(None, headers)
            response.status = HTTPStatus.NOT_MODIFIED
            return response
        return WSUpgradeResponse.create_ok_response(self.body, headers)


def load_all(ws_path: str = "/ws") -> dict[str, StaticFile]:
    """Every route's file; the dashboard told where the WebSocket endpoint is."""
    ws = {WS_PATH_ATTRIBUTE: b'data-ws-path="' + html.escape(ws_path).encode() + b'"'}
    return {path: StaticFile.load(name, content_type, headers, ws if name == "dashboard.html" else None)
            for path, (name, content_type, headers) in ROUTES.items()}
