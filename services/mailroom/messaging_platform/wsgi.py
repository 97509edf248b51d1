"""The WSGI application of the web role (gunicorn serves it).

Django reads a request body only up to ``CONTENT_LENGTH``. A body sent with
``Transfer-Encoding: chunked`` has no length, so Django saw an empty body: a JSON send
answered "not valid JSON" (or, worse, passed as empty). :class:`ChunkedBodies` reads such
a body to its end first (gunicorn decodes the chunks), spooling a large one to disk, and
hands Django the same request with a length. A body past the upload limit is refused
with a 413 in the API's error shape, without reading the rest.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "messaging_platform.settings")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_CHUNK = 64 * 1024


class ChunkedBodies:
    """WSGI middleware: give a chunked request body a ``CONTENT_LENGTH``."""

    def __init__(self, app: WSGIApp, max_bytes: int, memory_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        encoding = str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower()
        if "chunked" not in encoding or environ.get("CONTENT_LENGTH"):
            return self.app(environ, start_response)
        body = self._read(environ["wsgi.input"])
        if body is None:
            return self._too_large(start_response)
        environ["CONTENT_LENGTH"] = str(body.tell())
        body.seek(0)
        environ["wsgi.input"] = body
        return self.app(environ, start_response)

    def _read(self, stream: IO[bytes]) -> IO[bytes] | None:
        """The whole body in a spooled file (memory up to ``memory_bytes``), or None
        when it passes ``max_bytes``."""
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=self.memory_bytes)  # noqa: SIM115
        size = 0
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > self.max_bytes:
                spool.close()
                return None
            spool.write(chunk)
        return spool

    def _too_large(self, start_response: StartResponse) -> list[bytes]:
        detail = f"the request body is larger than {self.max_bytes} bytes"
        body = json.dumps({"error": "too_large", "detail": detail, "errors": []}).encode()
        start_response(
            "413 Request Entity Too Large",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        return [body]


def _application() -> WSGIApp:
    from django.conf import settings

    from messaging_platform.checks import enforce

    django_app = get_wsgi_application()
    # The settings are checked as each web worker loads the application: a bad one stops
    # gunicorn ("Worker failed to boot"), naming the variable, before it serves anything.
    enforce("web")
    return ChunkedBodies(
        django_app,
        max_bytes=max(settings.MAILROOM_API_MAX_UPLOAD_BYTES, settings.MAILROOM_API_MAX_BODY_BYTES),
        memory_bytes=settings.MAILROOM_API_MAX_BODY_BYTES,
    )


application = _application()
