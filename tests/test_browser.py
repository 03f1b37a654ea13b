"""Real-browser tests: the built book, and notebook 03's risk-map explorer served by Voila, in
Debian's chromium driven by Playwright for Python (``executable_path``; Playwright's own browser download is never used).

Every page is served from 127.0.0.1; a request to a known CDN (MathJax, require.js) is blocked
without failing the page, any other request leaving 127.0.0.1 fails the test. Screenshots are kept
under ``runs/browser-tests/`` (``TRM_SCREENSHOTS`` to change it) to be looked at.
"""
import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from trm_utils.utils import REPO_ROOT

CHROMIUM = os.environ.get("TRM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None
if not CHROMIUM or sync_playwright is None:
    pytest.skip("browser tests skipped (tests/test_browser.py: the book's pages, notebook 03's explorer in Voila): "
                + ("no chromium found; `apt-get install chromium` or TRM_CHROMIUM=/path/to/chromium enables them"
                   if not CHROMIUM else "playwright missing; `pip install -e .[test]` enables them"),
                allow_module_level=True)

#: hosts the pages may ask for and that the tests block without failing (typesetting and loaders)
KNOWN_CDNS = ("cdnjs.cloudflare.com", "cdn.jsdelivr.net", "unpkg.com")
#: Voila shows the notebook's markdown as it is, so its Colab badge asks for the badge image too (the book
#: turns the badge into text)
BADGE_HOSTS = ("colab.research.google.com",)
SHOTS = Path(os.environ.get("TRM_SCREENSHOTS", REPO_ROOT / "runs" / "browser-tests"))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Guard:
    """Blocks requests that leave 127.0.0.1 and records them, and records console errors."""

    def __init__(self, page, known=KNOWN_CDNS):
        self.known = known
        self.blocked_cdn, self.unexpected, self.errors, self.failed = [], [], [], set()
        page.route("**/*", self._route)
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed.add(r.url))

    def _route(self, route):
        host = urlparse(route.request.url).hostname or ""
        if route.request.url.startswith("data:") or host in ("127.0.0.1", "localhost"):
            return route.continue_()
        (self.blocked_cdn if host in self.known else self.unexpected).append(route.request.url)
        return route.abort()

    def real_errors(self) -> list:
        # a resource we blocked on purpose logs "Failed to load resource"; anything else is a real error
        return [e for e in self.errors if "Failed to load resource" not in e and "net::ERR_FAILED" not in e]


# ----------------------------------------------------------------------------- the book

@pytest.fixture(scope="module")
def book(smoke_run, tmp_path_factory):
    from trm_utils.book import build_book

    out = build_book(smoke_run[0], tmp_path_factory.mktemp("site") / "book", log=lambda *a: None)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(out), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_book_pages_load_with_images_and_working_links(book, browser):
    out, base = book
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    guard = Guard(page)
    page.goto(f"{base}/index.html")
    chapters = page.eval_on_selector_all("table a", "els => els.map(e => e.getAttribute('href'))")
    assert chapters == [f"{nb}.html" for nb in ("01_leep", "02_pixel_leep", "03_risk_maps", "04_weighted_finetuning",
                                                  "05_few_shot", "06_transfer_cell", "07_reproduce_paper")]
    page.screenshot(path=str(SHOTS / "book_index.png"))
    n_images = 0
    for name in chapters:
        page.goto(f"{base}/{name}", wait_until="load")
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.src.slice(0, 40)])")
        assert sizes, f"{name} shows no image"
        assert all(ok and w > 0 for ok, w, _ in sizes), f"{name}: images that did not decode: {[s for s in sizes if not s[1]]}"
        n_images += len(sizes)
        links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
        for href in links:
            if re.match(r"^[a-z]+:", href) or href.startswith("//"):
                continue  # GitHub, Colab: outside the book
            path, _, frag = href.partition("#")
            target = out / unquote(path) if path else out / name
            assert target.is_file(), f"{name}: link {href!r} leads nowhere"
            if frag:
                assert f'id="{frag}"' in target.read_text(encoding="utf-8"), f"{name}: anchor {href!r} not found"
        assert page.locator("nav.trm-nav a", has_text="Contents").count() == 2
        page.screenshot(path=str(SHOTS / f"book_{name.replace('.html', '')}.png"))
    assert n_images >= 20
    assert not guard.unexpected, f"requests left 127.0.0.1 for unknown hosts: {guard.unexpected[:5]}"
    assert not guard.real_errors(), guard.real_errors()[:5]


# ----------------------------------------------------------------------------- the explorer in Voila

@pytest.fixture(scope="module")
def voila_explorer(tmp_path_factory):
    """Notebook 03 with the smoke parameters injected, served by Voila on 127.0.0.1."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from .conftest import SMOKE

    work = tmp_path_factory.mktemp("voila")
    nb = load_notebook_node(str(REPO_ROOT / "notebooks" / "03_risk_maps.ipynb"))
    params = {k: v for k, v in SMOKE.items() if k in ("preset", "seeds", "show_progress")}
    params.update(data_dir=str(work / "data"), output_dir=str(work / "out"))
    nbformat.write(parameterize_notebook(nb, params), work / "03_risk_maps.ipynb")
    port = free_port()
    env = {**os.environ, "TRM_CACHE_DIR": str(work / "cache"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    log = open(work / "voila.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "voila", str(work / "03_risk_maps.ipynb"), "--no-browser",
                             f"--port={port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
                             # jupytext's JupyterLab extension (installed with jupytext) needs JupyterLab's document
                             # manager, which a Voila page has not: it fails to load there with a console error
                             # (#RUNTIME-012, shareKey @jupyterlab/docmanager). A dashboard has no use for it.
                             "--VoilaConfiguration.extension_denylist=['jupyterlab-jupytext']"],
                            cwd=str(work), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            with contextlib.closing(socket.socket()) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"voila did not start: {(work / 'voila.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}/", work
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _risk_image(page) -> str:
    """The explorer's current figure (the PNG in its output area)."""
    img = page.locator(".widget-interact .widget-output img, .widget-interact img").last
    img.wait_for(timeout=120_000)
    return img.get_attribute("src")


def _wait_changed(page, before: str, what: str) -> str:
    for _ in range(120):
        now = _risk_image(page)
        if now != before:
            return now
        time.sleep(0.5)
    raise AssertionError(f"moving the {what} control did not change the explorer's figure")


def _set_readout(page, description: str, value: str):
    """Set a slider through its editable readout, as Voila's own UI tests do."""
    box = page.locator(".widget-slider", has=page.locator("label", has_text=description)).first
    readout = box.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(value)
    page.keyboard.press("Enter")


def test_explorer_controls_redraw_the_risk_image(voila_explorer, browser):
    url, work = voila_explorer
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    guard = Guard(page, KNOWN_CDNS + BADGE_HOSTS)
    # Voila streams the page while the notebook runs: wait for the explorer itself, not for the page's load event
    page.goto(url, wait_until="commit", timeout=120_000)
    try:
        page.locator(".widget-interact").first.wait_for(timeout=300_000)
    except Exception as exc:
        raise AssertionError(f"the explorer never showed ({type(exc).__name__}); Voila's log ends with:\n"
                             f"{(work / 'voila.log').read_text()[-1500:]}") from None
    first = _risk_image(page)
    _set_readout(page, "base", "100")
    after_base = _wait_changed(page, first, "base")
    _set_readout(page, "slice", "1")
    after_slice = _wait_changed(page, after_base, "slice")
    page.locator(".widget-interact button", has_text="per-image map").click()
    after_reading = _wait_changed(page, after_slice, "reading")
    page.locator(".widget-interact select").first.select_option(index=1)
    _wait_changed(page, after_reading, "pair")
    page.screenshot(path=str(SHOTS / "voila_explorer.png"), full_page=True)
    assert not guard.unexpected, f"requests left 127.0.0.1 for unknown hosts: {guard.unexpected[:5]}"
    assert not guard.real_errors(), guard.real_errors()[:5]
