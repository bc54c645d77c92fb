"""The demo in a real browser: Debian's headless Chromium loads the page, the test fills the prompt,
clicks Generate and finds the generated image in the DOM.

Run as a script to take the README's screenshot (the bundled testbed model, maps of every word):
    python tests/test_ui_browser.py docs/ui.png
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the flags this machine's closed network needs (no background connections, no sandbox as root)
FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --disable-dev-shm-usage"
).split()


def browser(width: int = 1400, height: int = 1600):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def fill_and_generate(driver, url: str, prompt: str, timeout: float = 180) -> str:
    """Load the app, type `prompt`, click Generate; the generated image's src."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    image = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#controlled img"))[0]
    return image.get_attribute("src")


def _have_browser() -> bool:
    return all(shutil.which(p) for p in (CHROMIUM, CHROMEDRIVER))


# CI installs the browser and sets ATTNCTL_BROWSER_TESTS=1, so there this test always runs
needs_browser = pytest.mark.skipif(
    not _have_browser() and os.environ.get("ATTNCTL_BROWSER_TESTS") != "1",
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@needs_browser
def test_the_page_generates_an_image_in_a_real_browser():
    pytest.importorskip("gradio", reason="the demo needs the ui extra: pip install -e '.[ui]'")
    from attnctl.tiny import tiny_pipeline
    from attnctl.ui import TITLE, build_app

    app = build_app(tiny_pipeline("sd"), model="tiny:sd", call_kwargs={"height": 32, "width": 32}, steps=2)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    driver = browser()
    try:
        src = fill_and_generate(driver, app.local_url, "a cat and a frog")
        assert driver.title == TITLE
        assert "/gradio_api/file=" in src and src.endswith(".png")
    finally:
        driver.quit()
        app.close()


def screenshot(path: Path) -> None:
    """Serve the bundled testbed model opened with maps and A-STAR, generate, save a screenshot."""
    import torch

    torch.set_num_threads(1)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import attnctl
    from attnctl.pipelines import load_pipeline
    from attnctl.ui import CSS, build_app

    controls = [
        attnctl.AttentionMaps(["red", "circle", "blue", "square"]),
        attnctl.AStar(["circle", "square"]),
    ]
    app = build_app(load_pipeline(None), steps=25, prompt="a red circle and a blue square", controls=controls)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False, css=CSS)
    driver = browser(1400, 1500)
    try:
        driver.get(app.local_url)
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
        for summary in driver.find_elements(By.CSS_SELECTOR, "button.label-wrap"):
            if summary.text.strip().startswith("AStar"):
                summary.click()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#maps img"))
        time.sleep(2)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
        app.close()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ui.png"))
