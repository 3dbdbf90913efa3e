"""Debian's headless Chromium driven by Selenium, for tests that look at a page as a person would.

``make browser`` installs ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``). The flags keep Chromium off the network this machine does not have
(background requests, component updates, sync) and out of a sandbox that root cannot use.

    python -m tests.browser reports/report.html docs/report.png                    # the whole page
    python -m tests.browser reports/report.html docs/report-method.png section.trace  # its first match
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


class BrowserMissing(RuntimeError):
    pass


@contextmanager
def headless_chromium(width: int = 1300, height: int = 1000) -> Iterator[object]:
    """A Selenium WebDriver on a fresh profile, quit (and its profile removed) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        raise BrowserMissing(f"{', '.join(missing)} missing: run `make browser` (Debian's chromium, chromium-driver)")
    profile = tempfile.mkdtemp(prefix="attnrl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_screenshot(driver, path: Path) -> Path:
    """The whole page, not only the window: the window is resized to the page's height first."""
    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(max(width, 800), height + 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"Chromium wrote no screenshot to {path}")
    return path


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    page, out = Path(argv[0]).resolve(), Path(argv[1])
    with headless_chromium() as driver:
        driver.get(page.as_uri())
        if len(argv) == 3:
            full_page_screenshot(driver, out)  # the window as tall as the page: the element fits in it
            if not driver.find_element("css selector", argv[2]).screenshot(str(out)):
                raise RuntimeError(f"Chromium wrote no screenshot of {argv[2]} to {out}")
        else:
            full_page_screenshot(driver, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
