"""The shared population server: a repository over HTTP (FastAPI), with token scopes.

Endpoints (all under ``/api/v1``; OpenAPI at ``/openapi.json``):

* ``GET  /info`` → limits and version                                              (read)
* ``GET  /refs`` → ``{"refs": {name: id}, "head": branch}``                         (read)
* ``POST /objects/missing`` ``{"ids": [...]}`` → ``{"missing": [...]}``            (read)
* ``POST /objects/get`` ``{"ids": [...]}`` → a pack of those objects, in order       (read)
* ``GET  /objects/{id}`` → the object file (format.md §5)                         (read)
* ``POST /objects`` body: a pack → 201; every object re-hashed, all or nothing      (write)
* ``PUT  /objects/{id}`` body: the object file → 201; re-hashed, rejected on mismatch (write)
* ``POST /refs/{name}`` ``{"old": id|null, "new": id}`` → compare-and-swap          (write)

Packs and the rules are specified in docs/wire.md. A record is accepted only
if every object it refers to is already stored (or earlier in the same pack),
so the server's store is always closed under references and an interrupted
push resumes where it stopped. A ref moves only if every object reachable
from the new commit is present.
Tokens come from the server's configuration (``server.tokens``: token → list
of scopes ``read``/``write``/``force``); ``server.anonymous_read`` lets anyone read.
A ref may name only a commit whose whole closure is present and well-typed;
a branch moves only forward and a tag never, unless the token has ``force``.
Ids must be 64 lower-case hex digits, ref names pass ``validate_ref_name``
(no ``..``, no traversal), objects are limited in size, and record bodies are
decoded with the canonical decoder's limits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from typing import Callable

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.routing import Match, Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import canonical
from .errors import ConflictError, CryopoolError, InvalidInputError
from .hashing import Kind, ObjectId, hash_bytes, is_object_id
from .records import parse_record, reference_targets
from .refs import validate_ref_name
from .remote import is_ancestor
from .repository import Repository
from .store import decode_object_file, encode_object_file
from .transport import FRAME_HEADER, children_of, encode_frames, iter_frames
from .verify import verify

__all__ = ["create_app", "serve_in_thread", "token_checker", "bearer_token", "MAX_OBJECT_BYTES", "MAX_REQUEST_BYTES"]

MAX_OBJECT_BYTES = 256 * 1024 * 1024
MAX_REQUEST_BYTES = 512 * 1024 * 1024
MAX_IDS = 100_000
MAX_JSON_BYTES = 8 * 1024 * 1024  # request bodies other than packs and objects: MAX_IDS ids fit
API = "/api/v1"
PACK = "application/x-cryopool-pack"  # wire.md: frames of object files
OBJECT = "application/octet-stream"  # format.md §5: one object file
ID_PATTERN = "^[0-9a-f]{64}$"


class Missing(BaseModel):
    # declared for clients; checked by hand, so a bad id is a 400 naming it (wire.md)
    ids: list[str] = Field(json_schema_extra={"items": {"type": "string", "pattern": ID_PATTERN},
                                              "maxItems": MAX_IDS, "uniqueItems": True})


class Problem(BaseModel):
    """Every 4xx/5xx answer: what was wrong, in one sentence."""

    detail: str | list


_WHY = {400: "malformed or refused: a bad id or ref name, an object that does not hash to its id, a record "
             "referring to what is not stored, a commit whose closure is incomplete",
        401: "no token, or an unknown one", 403: "the token lacks the scope this needs",
        404: "no such object", 409: "the ref is not at `old` (fetch, merge, push again)",
        411: "a JSON body needs a Content-Length",
        413: "the body, an object or the id list is over the limit (`/info`)",
        415: "the body's Content-Type is not the one declared",
        422: "the JSON body does not match the schema",
        500: "the stored object is damaged (the server never serves it; run `cryopool verify` there)"}


def _responses(*codes: int, ok: int = 200, content: str | None = None) -> dict:
    """The answers an endpoint gives, for its OpenAPI description (clients are generated from it)."""
    out: dict = {code: {"model": Problem, "description": _WHY[code]} for code in codes}
    if content is not None:
        out[ok] = {"content": {content: {"schema": {"type": "string", "format": "binary"}}},
                   "description": "the body is " + content}
    return out


def _binary_body(content: str) -> dict:
    return {"requestBody": {"required": True,
                            "content": {content: {"schema": {"type": "string", "format": "binary"}}}}}


_ID_PARAMETER = {"parameters": [{"name": "object_id", "in": "path", "required": True,
                                 "schema": {"type": "string", "pattern": ID_PATTERN},
                                 "description": "an object id: 64 lower-case hex digits of BLAKE3"}]}
_AUTH, _JSON = (401, 403), (411, 413, 422)


class RefUpdate(BaseModel):
    old: str | None = Field(default=None, json_schema_extra={"anyOf": [{"type": "string", "pattern": ID_PATTERN},
                                                                       {"type": "null"}]})
    new: str = Field(json_schema_extra={"pattern": ID_PATTERN})


def _check_id(object_id: str) -> str:
    if not is_object_id(object_id):
        raise HTTPException(400, f"not an object id: {object_id[:80]!r}")
    return object_id


def _closure_problem(repo: Repository, commit: str, ref: str) -> str | None:
    """Why ``commit`` may not be what ``ref`` names: missing objects, a non-commit, records of the wrong type.

    The same walk as ``verify`` (structure only: leaves were re-hashed on upload),
    from this commit alone, so a ref never names anything ``verify`` would refuse.
    """
    report = verify(repo, quick=True, start={ObjectId(commit): [f"update of {ref}"]})
    if report.ok:
        return None
    missing = [p for p in report.problems if p.problem == "missing object"]
    if missing:
        return f"{len(missing)} object(s) reachable from {commit[:12]} are missing, e.g. {missing[0].object_id}"
    first = report.problems[0]
    return f"object {first.object_id}: {first.problem}"


def _checked(object_id: str, raw: bytes, pending: set[str], has) -> tuple[Kind, bytes]:
    """One uploaded object file: decoded strictly (records as typed records), re-hashed, its children stored."""
    try:
        kind, data = decode_object_file(raw, f"upload {object_id}")
        if kind == Kind.RECORD:  # bounded, canonical, a known record type with its fields and reference kinds
            record = parse_record(canonical.decode(data, where=f"upload {object_id}"), f"upload {object_id}")
            for field, ref, target in reference_targets(record):
                if ref.kind != target.kind:
                    raise InvalidInputError(f"field {field} refers to a {ref.kind.name.lower()}, "
                                            f"expected a {target.kind.name.lower()}", path=f"upload {object_id}")
    except CryopoolError as exc:
        raise HTTPException(400, str(exc)) from None
    actual = hash_bytes(kind, data)
    if actual != object_id:
        raise HTTPException(400, f"content hashes to {actual}, not {object_id}")
    absent = [k for k in children_of(kind, data) if k not in pending and not has(k)]
    if absent:
        raise HTTPException(400, f"record {object_id} refers to {absent[0]}, which is not stored: "
                                 "send the objects a record refers to first")
    return kind, bytes(data)


async def _body(request: Request, limit: int, what: str, content_type: str) -> bytes:
    given = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if given != content_type:
        raise HTTPException(415, f"a {what} is sent as {content_type}, not {given or 'no Content-Type'}")
    length = int(request.headers.get("content-length") or 0)
    if length > limit:
        raise HTTPException(413, f"{what} larger than {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise HTTPException(413, f"{what} larger than {limit} bytes")
    return bytes(body)


Pages = Callable[[Repository, Callable[[str | None, str], None]], APIRouter]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header (None for none or another scheme)."""
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    return authorization.removeprefix("Bearer ").strip()


def token_checker(tokens: dict[str, list[str]], anonymous_read: bool) -> Callable[[str | None, str], None]:
    """``check(token, scope)``: returns if ``token`` (None: none given) may do ``scope``, else raises 401/403."""
    def check(token: str | None, needed: str) -> None:
        if needed == "read" and anonymous_read:
            return
        if not token:
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
        scopes = tokens.get(token)
        if scopes is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        if needed not in scopes:
            raise HTTPException(403, f"token lacks the '{needed}' scope")
    return check


def create_app(repo_path: str, *, tokens: dict[str, list[str]] | None = None,
               anonymous_read: bool | None = None, max_object_bytes: int = MAX_OBJECT_BYTES,
               max_request_bytes: int = MAX_REQUEST_BYTES, pages: Pages | None = None) -> FastAPI:
    """A FastAPI app serving the repository at ``repo_path`` (settings default to its config).

    ``pages(repo, check)`` may add a router of read-only pages (the web view, which lives above this
    layer); ``check(token, scope)`` is the API's own token rule, so pages and API share tokens and scopes.
    """
    repo = Repository.open(repo_path, search_parents=False)
    cfg = repo.config.get("server", {})
    tokens = tokens if tokens is not None else cfg.get("tokens", {})
    anonymous_read = cfg.get("anonymous_read", False) if anonymous_read is None else anonymous_read
    # Swagger UI (/docs) and ReDoc (/redoc) from fastapi-offline's own files: they work with no internet
    app = FastAPIOffline(title="cryopool shared population", version="1")
    check_token = token_checker(tokens, anonymous_read)

    def scope(needed: str):
        def check(authorization: str | None = Header(default=None)) -> None:
            check_token(bearer_token(authorization), needed)
        return check

    read, write = Depends(scope("read")), Depends(scope("write"))

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        """Allow lists every method the path takes (Starlette names only the first route's: GET, not PUT)."""
        routes = [r for r in app.router.routes if isinstance(r, Route) and r.matches(request.scope)[0] is not Match.NONE]
        literal = [r for r in routes if "{" not in r.path]  # /objects/missing is not /objects/{object_id}
        allowed = sorted({m for r in literal or routes for m in (r.methods or ())})
        return JSONResponse({"detail": f"{request.method} is not allowed here; use {', '.join(allowed)}"},
                            status_code=405, headers={"Allow": ", ".join(allowed)})
    if pages is not None:
        app.include_router(pages(repo, check_token))

    @app.get(f"{API}/info", dependencies=[read], responses=_responses(*_AUTH))
    def info() -> dict:
        return {"api": 1, "max_object_bytes": max_object_bytes,
                "max_request_bytes": max(max_request_bytes, max_object_bytes + FRAME_HEADER.size + 16),
                "max_ids": MAX_IDS}

    @app.get(f"{API}/refs", dependencies=[read], responses=_responses(*_AUTH))
    def refs() -> dict:
        return {"refs": repo.refs.list("refs/heads/") | repo.refs.list("refs/tags/"), "head": repo.head().branch}

    @app.middleware("http")
    async def bounded_json(request: Request, call_next):
        """JSON bodies are parsed whole: refuse large ones before reading them (packs have their own limit)."""
        packs = request.url.path.rstrip("/").endswith("/objects") or request.method == "PUT"
        length = request.headers.get("content-length")
        if not packs and request.method == "POST":
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a Content-Length is required"}, status_code=411)
            if int(length) > MAX_JSON_BYTES:
                return JSONResponse({"detail": f"request body larger than {MAX_JSON_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    def _ids(body: Missing) -> list[str]:
        if len(body.ids) > MAX_IDS:
            raise HTTPException(413, f"too many ids in one request (max {MAX_IDS})")
        if len(set(body.ids)) != len(body.ids):
            raise HTTPException(400, "the same id more than once in one request")
        return [_check_id(i) for i in body.ids]

    @app.post(f"{API}/objects/missing", dependencies=[read], responses=_responses(400, *_AUTH, *_JSON))
    def missing(body: Missing) -> dict:
        return {"missing": [i for i in _ids(body) if not repo.store.has(i)]}

    @app.post(f"{API}/objects/get", dependencies=[read], response_class=StreamingResponse,
              responses=_responses(400, *_AUTH, 404, *_JSON, content=PACK))
    def get_objects(body: Missing) -> StreamingResponse:
        _ids(body)
        absent = [i for i in body.ids if not repo.store.has(_check_id(i))]
        if absent:
            raise HTTPException(404, f"object {absent[0]} not found ({len(absent)} missing)")

        def frames():
            for oid in body.ids:
                kind, data = repo.store.get(oid, verify=True)  # never serve a damaged object
                yield from encode_frames([(oid, kind, data)])
        return StreamingResponse(frames(), media_type=PACK)

    @app.post(f"{API}/objects", status_code=201, dependencies=[write], responses=_responses(400, *_AUTH, 413, 415),
              openapi_extra=_binary_body(PACK))
    async def put_pack(request: Request) -> dict:
        body = await _body(request, max(max_request_bytes, max_object_bytes + FRAME_HEADER.size + 16), "pack", PACK)
        checked, pending = [], set()
        try:
            for oid, raw in iter_frames([body], "uploaded pack", max_object_bytes):
                kind, data = _checked(oid, raw, pending, repo.store.has)
                checked.append((kind, data))
                pending.add(oid)
        except CryopoolError as exc:
            raise HTTPException(413 if "larger than" in exc.message else 400, str(exc)) from None
        for kind, data in checked:  # nothing is written unless the whole pack is sound; children come first
            repo.store.put(kind, data)
        repo.store.sync()
        return {"stored": len(checked)}

    @app.get(f"{API}/objects/{{object_id}}", dependencies=[read], response_class=Response,
             responses=_responses(400, *_AUTH, 404, 500, content=OBJECT),
             openapi_extra=_ID_PARAMETER)
    def get_object(object_id: str) -> Response:
        _check_id(object_id)
        try:
            kind, data = repo.store.get(object_id, verify=True)
        except CryopoolError as exc:
            raise HTTPException(404 if "not found" in exc.message else 500, exc.message) from None
        return Response(encode_object_file(kind, data, None), media_type=OBJECT)

    @app.put(f"{API}/objects/{{object_id}}", status_code=201, dependencies=[write],
             responses=_responses(400, *_AUTH, 413, 415), openapi_extra=_ID_PARAMETER | _binary_body(OBJECT))
    async def put_object(object_id: str, request: Request) -> dict:
        _check_id(object_id)
        body = await _body(request, max_object_bytes + 16, "object", OBJECT)
        kind, data = _checked(object_id, body, set(), repo.store.has)
        repo.store.put(kind, data)
        return {"id": object_id}

    @app.post(f"{API}/refs/{{name:path}}", responses=_responses(400, *_AUTH, 409, *_JSON))
    def update_ref(name: str, body: RefUpdate, request: Request,
                   authorization: str | None = Header(default=None)) -> dict:
        scope("write")(authorization)
        if request.scope["path"] != f"{API}/refs/{name}":  # the router's pattern drops a trailing newline
            raise HTTPException(400, f"invalid ref name {request.scope['path'].removeprefix(API + '/refs/')!r}")
        try:
            validate_ref_name(name)
            new = ObjectId(body.new)
            old = ObjectId(body.old) if body.old else None
        except InvalidInputError as exc:
            raise HTTPException(400, str(exc)) from None
        if not name.startswith(("refs/heads/", "refs/tags/")):
            raise HTTPException(400, "only refs/heads/* and refs/tags/* can be pushed")
        problem = _closure_problem(repo, new, name)
        if problem:
            raise HTTPException(400, problem)
        current = repo.refs.read(name)
        if current != old:  # a lost race (or a stale client): fetch and merge, as before any other judgement
            raise HTTPException(409, f"{name} is {str(current)[:12]}, not {str(old)[:12]}")
        if current is not None and current != new:
            # a tag never moves and a branch only moves forward, unless the token may force it
            forward = name.startswith("refs/heads/") and repo.store.has(current) and is_ancestor(repo, current, new)
            if not forward:
                try:
                    scope("force")(authorization)
                except HTTPException:
                    what = "tags never move" if name.startswith("refs/tags/") else \
                        f"{new[:12]} does not descend from {current[:12]} (not a fast-forward)"
                    raise HTTPException(403, f"{name}: {what}; moving it needs a token with the 'force' scope") \
                        from None
        repo.store.sync()
        try:
            repo.refs.update(name, new, expected=old, author="server", message="push")
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"ref": name, "id": new}

    return app


HEADER_TIMEOUT_S = 10.0  # a request line and its headers must arrive within this time
KEEP_ALIVE_S = 5  # an idle connection is closed after this time
MAX_CONNECTIONS = 64  # served at once; more are answered 503


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers.

    uvicorn has none: a client that opens a connection and trickles its headers
    a byte at a time (slowloris) holds it for ever, and 64 such clients hold the
    server. Here the connection is closed when a request's head is still
    incomplete ``header_timeout`` seconds after the connection opened or the
    previous response ended. Bodies are not timed (each endpoint bounds their size).
    """

    header_timeout: float = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:  # noqa: ANN001 — asyncio's signature
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's head is complete
            self._deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_config(app: FastAPI, *, host: str, port: int, header_timeout: float = HEADER_TIMEOUT_S,
                  log_level: str = "warning") -> uvicorn.Config:
    """How the server runs, for ``cryopool serve`` and :func:`serve_in_thread` alike: idle connections closed
    after 5 s, request heads due within ``header_timeout``, at most 64 connections at once."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": float(header_timeout)})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS)


@contextlib.contextmanager
def serve_in_thread(repo_path: str, *, host: str = "127.0.0.1", port: int = 0,
                    header_timeout: float = HEADER_TIMEOUT_S, **options):
    """Serve a repository from a background thread (tests, benchmarks, embedding); yields the base URL.

    ``port=0`` picks a free port. The server stops when the block ends.
    """
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(str(repo_path), **options), host=host, port=port,
                                          header_timeout=header_timeout, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
