"""Screenshot a page of the Prefect UI in headless Chromium (how docs/prefect-ui-*.png were made).

    python scripts/screenshot_ui.py URL OUT.png [--wait-text Completed]

Needs Debian's chromium (``apt-get install chromium``) and ``pip install playwright`` in any
environment; neither is a dependency of attnrl. Chromium starts with the background-networking
switches off (this machine's network is closed) and a throwaway profile.
"""

from __future__ import annotations

import argparse
import tempfile

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--wait-text", default=None, help="wait until this text is on the page")
    parser.add_argument("--tab", default=None, help="open this tab of a run page first (e.g. 'Task Runs')")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": args.width, "height": args.height},
        )
        page = browser.new_page()
        page.goto(args.url, wait_until="networkidle", timeout=60_000)
        if args.wait_text:
            page.get_by_text(args.wait_text).first.wait_for(timeout=60_000)
        page.wait_for_timeout(2_000)  # let charts and the run graph finish drawing
        if args.tab:  # e.g. "Task Runs": the list below the run graph
            page.get_by_text(args.tab, exact=True).first.click()
            page.wait_for_timeout(2_000)
            page.mouse.wheel(0, 420)
            page.wait_for_timeout(1_000)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()
