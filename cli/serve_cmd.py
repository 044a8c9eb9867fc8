"""``cryopool serve``: share this repository over HTTP (FastAPI + uvicorn) with token scopes."""

from __future__ import annotations

import click
import uvicorn

from cryopool.repo.server import create_app, server_config

from .common import Context, handle_errors
from .web import web_pages

__all__ = ["COMMANDS"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True)
@click.option("--token", "tokens", multiple=True, metavar="TOKEN:SCOPES",
              help="A bearer token and its scopes, e.g. s3cret:read,write (repeatable; default: config server.tokens).")
@click.option("--anonymous-read", is_flag=True, default=None, help="Anyone may read (clone, fetch).")
@click.pass_obj
@handle_errors
def serve(obj: Context, host: str, port: int, tokens: tuple[str, ...], anonymous_read: bool | None) -> None:
    """Serve the repository as a shared population (push needs a token with the write scope), with a web view."""
    parsed = None
    if tokens:
        parsed = {}
        for t in tokens:
            token, _, scopes = t.partition(":")
            if not token or not scopes:
                raise click.BadParameter(f"{t!r}: expected TOKEN:SCOPES", param_hint="--token")
            parsed[token] = [s.strip() for s in scopes.split(",") if s.strip()]
            unknown = sorted(set(parsed[token]) - {"read", "write", "force"})
            if unknown:
                raise click.BadParameter(f"unknown scope(s) {unknown}: read, write, force", param_hint="--token")
    app = create_app(str(obj.repo().work_dir), tokens=parsed, anonymous_read=anonymous_read, pages=web_pages)
    click.echo(f"Serving {obj.repo().work_dir} on http://{host}:{port} (pages: /web/, API: /docs)", err=True)
    # idle connections close after 5 s, request heads are due within 10 s and at most 64 connections are served at
    # once (503 beyond): a slow client cannot hold the server. On an open network put a TLS proxy in front
    uvicorn.Server(server_config(app, host=host, port=port)).run()


COMMANDS = [serve]
