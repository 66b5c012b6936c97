"""Check the built HTML site: local assets only, and math typeset in a real browser.

Usage: ``python docs/check_site.py [BUILD_DIR]`` (default ``docs/_build/html``).

1. Every ``<script src>`` and stylesheet ``<link href>`` in every page must be
   local: no ``http:``, ``https:`` or protocol-relative (``//host``) URLs.
2. The site is served on 127.0.0.1 and headless Chromium loads the math page;
   its DOM must contain MathJax's ``mjx-container`` elements (the equations were
   typeset from the local MathJax). A screenshot is saved next to the build.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["external_assets", "main", "render_math_page"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
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


class _AssetParser(HTMLParser):
    """Collects the URLs of scripts and stylesheets of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "script" and values.get("src"):
            self.urls.append(values["src"])
        elif tag == "link" and "stylesheet" in values.get("rel", "").split():
            self.urls.append(values.get("href", ""))


def _is_external(url: str) -> bool:
    url = url.strip().lower()
    return url.startswith(("http:", "https:", "//"))


def external_assets(site: Path) -> list[str]:
    """``'page: url'`` for every external script or stylesheet in the site."""
    found = []
    for page in sorted(site.rglob("*.html")):
        parser = _AssetParser()
        parser.feed(page.read_text(encoding="utf-8"))
        found += [
            f"{page.relative_to(site)}: {url}"
            for url in parser.urls
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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def render_math_page(site: Path, screenshot: Path) -> str:
    """Serve `site` on 127.0.0.1, load the math page in Chromium, return its DOM."""
    if not Path(CHROMIUM).exists():
        ci = " (CI=true)" if os.environ.get("CI") == "true" else ""
        msg = (
            f"{CHROMIUM} not found{ci}: the browser check needs Debian's chromium; "
            "install it with `apt-get install chromium`"
        )
        raise FileNotFoundError(msg)
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{MATH_PAGE}"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bnarray-chromium-") as profile:
            common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run(
                [*common, "--virtual-time-budget=10000", "--dump-dom", url],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
        with tempfile.TemporaryDirectory(prefix="bnarray-chromium-") as profile:
            common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
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


def main(argv: list[str]) -> int:
    """Run both checks; print what was found; 0 if the site passes."""
    site = Path(argv[1] if len(argv) > 1 else "docs/_build/html").resolve()
    if not (site / MATH_PAGE).is_file():
        print(f"FAIL: {site / MATH_PAGE} does not exist; build the docs first")
        return 1
    external = external_assets(site)
    if external:
        print("FAIL: external scripts or stylesheets (the site must work offline):")
        print("\n".join(f"  {item}" for item in external))
        return 1
    print(
        f"ok: {len(list(site.rglob('*.html')))} pages load only local scripts and styles"
    )

    screenshot = site.parent / "screenshots" / "math.png"
    try:
        dom = render_math_page(site, screenshot)
    except FileNotFoundError as exc:
        print(f"FAIL: {exc}")
        return 1
    except subprocess.SubprocessError as exc:
        print(f"FAIL: chromium did not render {MATH_PAGE}: {exc}")
        return 1
    typeset = dom.count("<mjx-container")
    if typeset == 0:
        print(
            f"FAIL: no <mjx-container> in the DOM of {MATH_PAGE}: MathJax did not run"
        )
        return 1
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        print(f"FAIL: chromium wrote no screenshot to {screenshot}")
        return 1
    print(f"ok: chromium typeset {typeset} formulas on {MATH_PAGE} (mjx-container)")
    print(f"ok: screenshot {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
