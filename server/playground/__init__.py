"""The chat page at ``/``: a static bundle (``static/``, built from ``src/`` by ``make playground``) that talks to
the public ``/v1`` API like any client. Served without an API key (it holds none; the page asks for one), with a
content security policy that keeps every request on this server."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PAGE_PREFIX = "/playground/"
POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
          "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def is_page(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (open without an API key)."""
    return path == "/" or path.startswith(PAGE_PREFIX)


def mount_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": POLICY,
                                                            "Cache-Control": "no-cache"})

    app.mount(PAGE_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="playground")
