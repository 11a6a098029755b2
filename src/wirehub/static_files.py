"""Files the gateway serves over plain HTTP: ``/wirehub.js``.

Each file is read once, from the installed package, when the gateway is
built; its ETag is a hash of its bytes, so a browser revalidates
(``Cache-Control: no-cache``) and gets a body-less ``304`` while the file is
unchanged, and a new wirehub release is never hidden behind a stale copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

from picows import WSUpgradeResponse

STATIC_PACKAGE = "wirehub.static"
# path -> (file in wirehub/static, content type)
ROUTES = {
    "/wirehub.js": ("wirehub.js", "text/javascript; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> StaticFile:
        body = resources.files(STATIC_PACKAGE).joinpath(name).read_bytes()
        return cls(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, if_none_match: str | None) -> Any:
        """200 with the body, or 304 when the request names the current ETag."""
        headers = {
            "Content-Type": self.content_type,
            "ETag": self.etag,
            "Cache-Control": "no-cache",
            # A module script is fetched in CORS mode: pages on another
            # origin may load the client (it is public code; no credentials).
            "Access-Control-Allow-Origin": "*",
        }
        if if_none_match is not None and self.etag in (tag.strip() for tag in if_none_match.split(",")):
            response = WSUpgradeResponse.create_ok_response(None, headers)
            response.status = HTTPStatus.NOT_MODIFIED
            return response
        return WSUpgradeResponse.create_ok_response(self.body, headers)


def load_all() -> dict[str, StaticFile]:
    return {path: StaticFile.load(name, content_type) for path, (name, content_type) in ROUTES.items()}
