"""The web view of ``cryopool serve``: read-only HTML pages for people, under ``/web``.

Pages: the refs (``/web/``), the log with its graph, a commit with its
operation record, a species, a tilt series, a diff between two commits,
``verify``'s result and the full report. They use the API's tokens and
scopes (``read``): a bearer header, or the token given once at
``/web/login`` and kept in an HttpOnly cookie; anonymous reading only where
the server allows it. Everything is rendered on the server from the same
sections as ``cryopool report``; no page loads anything from the internet.
Pages of a commit id never change (content addressing), so they are cached.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from typing import Callable
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cryopool.repo import CryopoolError, Repository
from cryopool.repo.diff import diff_populations
from cryopool.repo.population import find_item
from cryopool.repo.server import bearer_token
from cryopool.repo.verify import verify

from .history import commit_info, render_diff
from .report_pages import (LOG_ROWS, Links, history_of, item_section, json_text, log_rows, overview_section,
                           render, report_html, species_section)

__all__ = ["web_pages", "COOKIE"]

COOKIE = "cryopool_token"
CACHE_PAGES = 64


def _token(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization")) or request.cookies.get(COOKIE)


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/web") and "//" not in target else "/web/"


def web_pages(repo: Repository, check: Callable[[str | None, str], None]) -> APIRouter:
    """The pages as a router for :func:`cryopool.repo.server.create_app` (its ``pages`` argument)."""
    router = APIRouter(include_in_schema=False)
    drawing = threading.Lock()  # pyplot is not thread-safe; figures are drawn one page at a time
    cache: OrderedDict[tuple, str] = OrderedDict()

    def cached(key: tuple, build: Callable[[], str]) -> str:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        with drawing:
            html = build()
        cache[key] = html
        if len(cache) > CACHE_PAGES:
            cache.popitem(last=False)
        return html

    def page(fn):
        """Read scope first (else the login page), then the page; unknown revisions and names are a 404 page."""
        @functools.wraps(fn)
        def wrapper(request: Request, **kwargs) -> Response:
            try:
                check(_token(request), "read")
            except HTTPException as exc:
                if exc.status_code == 401:
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/web/login?{urlencode({'next': target})}", status_code=303)
                return HTMLResponse(render("message.html", title="Not allowed", message=exc.detail), exc.status_code)
            try:
                return HTMLResponse(fn(request, **kwargs))
            except (CryopoolError, KeyError) as exc:
                text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
                return HTMLResponse(render("message.html", title="Not found", message=text), 404)
        return wrapper

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/web/", status_code=303)

    @router.get("/web/login")
    def login_form(next: str | None = None, failed: bool = False) -> HTMLResponse:
        return HTMLResponse(render("login.html", next=_safe_next(next), failed=failed), 401 if failed else 200)

    @router.post("/web/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))  # a urlencoded form: token, next
        token, next = form.get("token", [""])[0], form.get("next", ["/web/"])[0]
        try:
            check(token, "read")
        except HTTPException:
            return RedirectResponse(f"/web/login?{urlencode({'next': _safe_next(next), 'failed': 1})}", 303)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @router.get("/web/logout")
    def logout() -> Response:
        response = RedirectResponse("/web/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @router.get("/web/")
    @page
    def index(request: Request) -> str:
        refs = repo.refs.list("refs/heads/") | repo.refs.list("refs/tags/")
        head = repo.head()
        return render("web_index.html", refs=refs, head=head.branch, links=Links("HEAD", web=True),
                      head_id=repo.resolve("HEAD") if refs else None)

    @router.get("/web/log")
    @page
    def log(request: Request, rev: str = "HEAD") -> str:
        cid = repo.resolve(rev)
        rows = log_rows(list(itertools.islice(repo.log(cid), LOG_ROWS)))
        return render("web_log.html", rev=rev, commit_id=cid, rows=rows, links=Links(cid, web=True))

    @router.get("/web/commit")
    @page
    def commit(request: Request, rev: str = "HEAD") -> str:
        cid = repo.resolve(rev)

        def build() -> str:
            info, _ = commit_info(repo, cid)
            return render("web_commit.html", rev=rev, info=info, links=Links(cid, web=True),
                          overview=overview_section(repo, cid), diff=render_diff(info["diff"]) if info["diff"] else None,
                          operation=json_text(info["operation"]))
        return cached(("commit", cid, rev), build)

    @router.get("/web/species")
    @page
    def species(request: Request, name: str, rev: str = "HEAD") -> str:
        cid = repo.resolve(rev)
        if name not in repo.population(cid).species:
            raise KeyError(f"no species {name!r} at {rev}")
        links = Links(cid, web=True)
        return cached(("species", cid, name, rev), lambda: render(
            "web_species.html", rev=rev, commit_id=cid, links=links,
            s=species_section(repo, history_of(repo, cid), name, links)))

    @router.get("/web/item")
    @page
    def item(request: Request, key: str, rev: str = "HEAD") -> str:
        cid = repo.resolve(rev)
        find_item(repo, repo.population(cid), key)  # a clear error for an unknown item
        return cached(("item", cid, key, rev), lambda: render(
            "web_item.html", rev=rev, commit_id=cid, i=item_section(repo, history_of(repo, cid), key),
            links=Links(cid, web=True)))

    @router.get("/web/diff")
    @page
    def diff(request: Request, a: str = "HEAD~1", b: str = "HEAD") -> str:
        ida, idb = repo.resolve(a), repo.resolve(b)
        d = diff_populations(repo, repo.population(ida), repo.population(idb))
        return render("web_diff.html", a=a, b=b, ida=ida, idb=idb, diff=d, lines=render_diff(d),
                      links=Links(idb, web=True))

    @router.get("/web/verify")
    @page
    def verify_page(request: Request) -> str:
        report = verify(repo)
        return render("web_verify.html", report=report, links=Links("HEAD", web=True))

    @router.get("/web/report")
    @page
    def report(request: Request, rev: str = "HEAD") -> str:
        cid = repo.resolve(rev)
        return cached(("report", cid), lambda: report_html(repo, cid)[0])

    return router
