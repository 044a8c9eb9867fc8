"""The web view of ``cryopool serve``: the API's tokens and scopes, pages that need no internet, and the pages
opened, read and followed in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest import _under_ci, needed, running_server
from cryopool.cli.web import COOKIE, web_pages
from cryopool.repo import ParticleTable, Species

TOKENS = {"reader": ["read"], "writer": ["read", "write"], "pusher": ["write"]}


@pytest.fixture(scope="module")
def server(merged_population):
    repo, planted = merged_population
    with running_server(str(repo.work_dir), tokens=TOKENS, pages=web_pages) as url:
        yield repo, planted, url


def test_pages_need_a_token_with_the_read_scope(server):
    repo, _, url = server
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.get("/web/species?name=a")
        assert r.status_code == 303 and r.headers["location"] == "/web/login?next=%2Fweb%2Fspecies%3Fname%3Da"
        assert c.get("/").headers["location"] == "/web/"
        for token in ("nonsense", "pusher"):  # unknown, and a token without the read scope
            r = c.post("/web/login", data={"token": token, "next": "/web/"})
            assert r.status_code == 303 and "failed=1" in r.headers["location"] and COOKIE not in r.cookies
        assert c.get("/web/", headers={"Authorization": "Bearer pusher"}).status_code == 403
        assert c.get("/web/", headers={"Authorization": "Bearer reader"}).status_code == 200
        r = c.post("/web/login", data={"token": "reader", "next": "//elsewhere.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/web/"  # never sent off the site
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/web/species?name=a").status_code == 200  # the cookie now
        # the cookie reads pages, never writes: the API takes bearer tokens only
        head = repo.resolve("HEAD")
        r = c.post("/api/v1/refs/refs/heads/x", json={"old": None, "new": head})
        assert r.status_code == 401 and "refs/heads/x" not in repo.refs.list("refs/heads/")
        r = c.get("/web/logout")
        assert r.status_code == 303 and c.get("/web/").status_code == 303


def test_anonymous_reading_where_the_server_allows_it(merged_population):
    repo, _ = merged_population
    with running_server(str(repo.work_dir), tokens=TOKENS, anonymous_read=True, pages=web_pages) as url:
        assert httpx.get(f"{url}/web/", timeout=60).status_code == 200
        assert httpx.post(f"{url}/api/v1/refs/refs/heads/x", json={"new": repo.resolve("HEAD")}).status_code == 401


def test_the_api_docs_load_nothing_from_the_internet(server):
    _, _, url = server
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{url}{page}").text
        assets = re.findall(r"""(?:src|href|spec-url)=['"]([^'"]+)['"]""", html) + \
            re.findall(r"url: ?'([^']+)'", html)
        assert len(assets) >= 2 and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
        for a in assets:
            assert httpx.get(f"{url}{a}").status_code == 200, a


def test_unknown_revisions_and_names_are_pages_that_say_so(server):
    _, _, url = server
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer reader"}, timeout=60) as c:
        for path, text in (("/web/commit?rev=nosuchbranch", "unknown revision"), ("/web/species?name=zz", "zz"),
                           ("/web/item?key=lab_x/TS_9", "lab_x/TS_9"), ("/web/diff?a=main~99&b=main", "past")):
            r = c.get(path)
            assert r.status_code == 404 and text in r.text, (path, r.text[-300:])


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if _under_ci():
        pytest.fail("chromium is missing under CI (.ci/run installs Debian's chromium)")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


def test_pages_in_a_real_browser(server, tmp_path):
    sync_api = needed("playwright.sync_api")
    executable = _chromium()
    repo, planted, url = server
    shots = Path(os.environ.get("CRYOPOOL_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    elsewhere = []
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)

        def offline(route):
            host = urlparse(route.request.url).hostname
            if route.request.url.startswith("data:") or host == "127.0.0.1":
                return route.continue_()
            elsewhere.append(route.request.url)
            return route.abort()
        page.route("**/*", offline)

        page.goto(f"{url}/web/")  # no token yet: the sign-in page
        assert page.inner_text("h1") == "Sign in"
        page.fill("#token", "reader")
        page.click("#sign-in")
        page.wait_for_selector("table.refs")
        page.screenshot(path=shots / "refs.png", full_page=True)
        refs = page.inner_text("table.refs")
        assert "main" in refs and "lab-b" in refs

        page.click(f"table.refs a[href='/web/commit?rev={repo.resolve('main')}']")
        page.wait_for_selector("pre.operation-record")
        assert page.inner_text("td.operation").startswith("merge")
        assert "species b" in page.inner_text("pre.diff")
        page.screenshot(path=shots / "commit.png", full_page=True)

        page.click("table.overview a:text-is('a')")  # the species page, from the commit's overview
        page.wait_for_selector(".fig-fsc svg")
        sp = repo.get_record(repo.population().species["a"], Species)
        assert page.inner_text("td.resolution") == f"{sp.metrics.resolution_angstrom:.2f} Å"
        assert "FSC between half-maps" in page.inner_text(".fig-fsc")
        assert page.locator(".provenance svg rect").count() >= 4
        page.screenshot(path=shots / "species.png", full_page=True)

        page.click(".history a >> nth=0")  # a version in the species' history: its commit page
        page.wait_for_selector("pre.operation-record")
        assert page.inner_text("td.operation").startswith("simulate")

        key = planted[0][0]
        page.goto(f"{url}/web/item?key={key}")
        page.wait_for_selector(".fig-particles svg")
        rows = page.locator("table.collisions tr").count() - 1
        assert rows == sum(1 for item, *_ in planted if item == key)
        page.screenshot(path=shots / "item.png", full_page=True)

        page.goto(f"{url}/web/log?rev=main")
        links = page.locator("pre.graph a")
        assert links.count() == sum(1 for _ in repo.log("main"))
        assert "*" in page.inner_text("pre.graph")
        page.screenshot(path=shots / "log.png", full_page=True)

        page.goto(f"{url}/web/diff?a=main~1&b=main")
        row = page.locator("table.particle-changes tr:has(td:first-child a:text-is('b'))").inner_text().split()
        b_after = repo.get_record(repo.get_record(repo.population().species["b"], Species).particles,
                                  ParticleTable).count
        assert row[:4] == ["b", str(b_after - len(planted)), str(b_after), str(len(planted))]
        page.screenshot(path=shots / "diff.png", full_page=True)

        page.goto(f"{url}/web/verify")
        assert page.inner_text(".verify-result") == "OK"

        page.goto(f"{url}/docs")  # Swagger UI, running from the package's own files
        page.wait_for_selector(".swagger-ui .title")
        assert "cryopool shared population" in page.inner_text(".swagger-ui .title")
        page.screenshot(path=shots / "api.png")
        browser.close()
    assert elsewhere == []
    assert len(list(shots.glob("*.png"))) >= 7
