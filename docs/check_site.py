"""Check the built HTML site: local assets, working links, math typeset in a browser.

Usage: ``python docs/check_site.py [BUILD_DIR]`` (default ``docs/_build/html``).

1. Every ``<script src>`` and stylesheet ``<link href>`` in every page must be
   local: no ``http:``, ``https:`` or protocol-relative (``//host``) URLs.
2. Every relative link and image (``<a href>``, ``<img src>``) must point to a
   file of the site, and its ``#fragment``, if any, to an ``id`` on that page.
3. The site is served on 127.0.0.1 and a headless Chromium-based browser loads
   the math page; its DOM must contain MathJax's ``mjx-container`` elements (the
   equations were typeset from the local MathJax). A screenshot is saved next to
   the build.

The browser is the one named by the ``BNARRAY_BROWSER`` environment variable (a
path or a command), else the first of ``chromium``, ``chromium-browser``,
``google-chrome`` and ``google-chrome-stable`` on ``PATH``. Without one, the
browser check fails when ``CI`` is set and is skipped, with a warning,
otherwise (``--require-browser`` makes it fail everywhere).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = [
    "broken_links",
    "external_assets",
    "find_browser",
    "main",
    "render_math_page",
]

BROWSER_VARIABLE = "BNARRAY_BROWSER"
BROWSER_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
]
MATH_PAGE = "math.html"
HOW_TO_GET_A_BROWSER = (
    "install Chromium (Debian/Ubuntu: `apt-get install chromium`; macOS: "
    "`brew install --cask chromium`) or Google Chrome, or set "
    f"{BROWSER_VARIABLE} to the path of a Chromium-based browser"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def find_browser() -> str | None:
    """The path of the browser to use: ``$BNARRAY_BROWSER``, else the first on PATH.

    Raises
    ------
    FileNotFoundError
        If ``BNARRAY_BROWSER`` is set but names no executable file.
    """
    named = os.environ.get(BROWSER_VARIABLE, "").strip()
    if named:
        found = shutil.which(named)
        if found is None:
            msg = f"{BROWSER_VARIABLE}={named!r} is not an executable file or a command on PATH"
            raise FileNotFoundError(msg)
        return found
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


class _PageParser(HTMLParser):
    """Collects the scripts, stylesheets, links, images and ids of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "a" and values.get("name"):
            self.ids.add(values["name"])
        if tag == "script" and values.get("src"):
            self.assets.append(values["src"])
        elif tag == "link" and "stylesheet" in values.get("rel", "").split():
            self.assets.append(values.get("href", ""))
        elif tag == "a" and "href" in values:
            self.links.append(values["href"])
        elif tag == "img" and values.get("src"):
            self.links.append(values["src"])


def _parse(page: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _is_external(url: str) -> bool:
    url = url.strip().lower()
    return url.startswith(("http:", "https:", "//"))


def external_assets(site: Path) -> list[str]:
    """``'page: url'`` for every external script or stylesheet in the site."""
    found = []
    for page in sorted(site.rglob("*.html")):
        found += [
            f"{page.relative_to(site)}: {url}"
            for url in _parse(page).assets
            if _is_external(url)
        ]
    for css in sorted(site.rglob("*.css")):
        text = css.read_text(encoding="utf-8", errors="replace").lower()
        for marker in (
            "@import url(http",
            "@import url(//",
            '@import "http',
            "@import 'http",
        ):
            if marker in text:
                found.append(f"{css.relative_to(site)}: {marker}...")
    return found


def broken_links(site: Path) -> list[str]:
    """``'page: url (why)'`` for every relative link or image that leads nowhere.

    External links (``http:``, ``mailto:``, ...) are not followed: the check runs
    offline.
    """
    pages = {page.resolve(): _parse(page) for page in sorted(site.rglob("*.html"))}
    found = []
    for page, parsed in pages.items():
        for url in parsed.links:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc:
                continue
            target = (
                (page.parent / unquote(parts.path)).resolve() if parts.path else page
            )
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(site.resolve())}: {url}"
            if not target.is_file():
                found.append(f"{where} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    found.append(f"{where} (no id {parts.fragment!r} on that page)")
    return found


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def render_math_page(site: Path, screenshot: Path, browser: str) -> str:
    """Serve `site` on 127.0.0.1, load the math page in `browser`, return its DOM."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{MATH_PAGE}"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bnarray-browser-") as profile:
            common = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run(
                [*common, "--virtual-time-budget=10000", "--dump-dom", url],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
        with tempfile.TemporaryDirectory(prefix="bnarray-browser-") as profile:
            common = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}"]
            subprocess.run(
                [
                    *common,
                    "--virtual-time-budget=10000",
                    "--window-size=1280,2400",
                    f"--screenshot={screenshot}",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
    finally:
        server.shutdown()
        server.server_close()
    return dom


def _warn_no_browser(reason: str) -> None:
    bar = "!" * 78
    print(
        f"{bar}\nSKIPPED: the browser check (MathJax typesets the math in a real "
        f"browser).\n{reason}.\nTo run it, {HOW_TO_GET_A_BROWSER}.\n"
        f"(With CI set, or with --require-browser, a missing browser is an error.)\n{bar}",
        file=sys.stderr,
    )


def _browser_check(site: Path, browser: str) -> int:
    screenshot = site.parent / "screenshots" / "math.png"
    try:
        dom = render_math_page(site, screenshot, browser)
    except subprocess.SubprocessError as exc:
        print(f"FAIL: {browser} did not render {MATH_PAGE}: {exc}")
        return 1
    typeset = dom.count("<mjx-container")
    if typeset == 0:
        print(
            f"FAIL: no <mjx-container> in the DOM of {MATH_PAGE}: MathJax did not run"
        )
        return 1
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        print(f"FAIL: {browser} wrote no screenshot to {screenshot}")
        return 1
    print(f"ok: {browser} typeset {typeset} formulas on {MATH_PAGE} (mjx-container)")
    print(f"ok: screenshot {screenshot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print what was found; 0 if the site passes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", type=Path, default=Path("docs/_build/html"))
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--require-browser",
        action="store_true",
        help="fail without a browser (the default when CI is set)",
    )
    group.add_argument(
        "--no-browser",
        action="store_true",
        help="skip the browser check (with a warning) even when a browser is found",
    )
    group.add_argument(
        "--find-browser",
        action="store_true",
        help="print the browser's path (nothing if none is found) and exit",
    )
    args = parser.parse_args(argv)
    try:
        browser = find_browser()
    except FileNotFoundError as exc:
        print(f"FAIL: {exc}")
        return 1
    if args.find_browser:
        if browser is not None:
            print(browser)
        return 0

    site = args.site.resolve()
    if not (site / MATH_PAGE).is_file():
        print(f"FAIL: {site / MATH_PAGE} does not exist; build the docs first")
        return 1
    external = external_assets(site)
    if external:
        print("FAIL: external scripts or stylesheets (the site must work offline):")
        print("\n".join(f"  {item}" for item in external))
        return 1
    pages = len(list(site.rglob("*.html")))
    print(f"ok: {pages} pages load only local scripts and styles")
    broken = broken_links(site)
    if broken:
        print("FAIL: links to pages, files or anchors that do not exist:")
        print("\n".join(f"  {item}" for item in broken))
        return 1
    print(f"ok: every relative link and image of the {pages} pages resolves")

    if args.no_browser:
        _warn_no_browser("--no-browser was given")
        return 0
    if browser is None:
        searched = f"${BROWSER_VARIABLE} is not set and none of {', '.join(BROWSER_NAMES)} is on PATH"
        if args.require_browser or _in_ci():
            why = "CI is set" if _in_ci() else "--require-browser was given"
            print(
                f"FAIL: no browser for the browser check ({why}): {searched}; {HOW_TO_GET_A_BROWSER}"
            )
            return 1
        _warn_no_browser(f"No browser found: {searched}")
        return 0
    return _browser_check(site, browser)


if __name__ == "__main__":
    sys.exit(main())
