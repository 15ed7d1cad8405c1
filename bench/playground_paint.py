"""The chat page's weight (gzipped bytes of what a first visit loads) and its first contentful paint in headless
Chromium (Debian's, through chromedriver), over fresh loads of a `qwen-serve` started here. Prints the CPU model
with the figures. Usage: .venv/bin/python bench/playground_paint.py [--loads 10]"""

from __future__ import annotations

import argparse
import gzip
import socket
import statistics
import subprocess
import sys

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from servers import cpu_model, wait_healthy

FIRST_VISIT = ["/", "/playground/app.js", "/playground/app.css"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port), "--log-level", "warning"])
    try:
        wait_healthy(url, server)
        weight = sum(len(gzip.compress(httpx.get(url + path).content)) for path in FIRST_VISIT)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        paints = []
        try:
            for _ in range(args.loads):
                driver.execute_cdp_cmd("Network.clearBrowserCache", {})
                driver.get(url + "/")
                paints.append(WebDriverWait(driver, 10).until(lambda d: d.execute_script(
                    "return performance.getEntriesByName('first-contentful-paint')[0]?.startTime")))
        finally:
            driver.quit()
        print(f"CPU: {cpu_model()}")
        print(f"first visit: {weight / 1024:.1f} KiB gzipped (page, script, styles)")
        print(f"first contentful paint over {len(paints)} cold loads: median {statistics.median(paints):.0f} ms, "
              f"max {max(paints):.0f} ms")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
