"""The chat page at ``/`` in a real headless Chromium (Debian's, driven by Selenium through its chromedriver; the
test setup installs both when absent): a streamed reply that grows, Stop that really aborts the request, the
conversation kept across a reload, the API-key prompt, no request to any host but the server, no console
errors, and a screenshot that is not blank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from server.settings import Settings
from tests.integration.conftest import API_KEY, SMOL_NAME, engine_for, serve, wait_for
from tests.integration.scripted import scripted_fixture
from tokenizer.chat import builtin_template

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def ensure_chromium() -> None:
    """Debian's chromium and chromium-driver, installed here when absent (the tests run as root in CI)."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


WATCH_REPLY_LENGTHS = """
window.replyLengths = [];
new MutationObserver(() => {
  const bodies = document.querySelectorAll('.message.assistant .body');
  if (bodies.length) window.replyLengths.push(bodies[bodies.length - 1].innerText.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def texts(driver, selector: str) -> list[str]:
    """The text of every element ``selector`` matches, read in one script (the page redraws while it streams)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)",
                                 selector)


def assistant_texts(driver) -> list[str]:
    return texts(driver, ".message.assistant .body")


def requested_hosts(driver) -> set[str]:
    """Every host the page sent a request to (from the browser's network log)."""
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def set_field(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def test_a_reply_streams_stops_and_survives_a_reload(browser, smol_server, tmp_path):
    driver = browser
    driver.get(smol_server.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait_for(lambda: by_id(driver, "model-name").text == SMOL_NAME, what="the model name")
    by_id(driver, "toggle-settings").click()
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "24")
    driver.execute_script(WATCH_REPLY_LENGTHS)
    by_id(driver, "input").send_keys("Which city is the capital of Germany?\n")
    wait_for(lambda: by_id(driver, "send").is_displayed() and any(assistant_texts(driver)), what="the reply")
    assert "Berlin" in assistant_texts(driver)[0]
    lengths = driver.execute_script("return window.replyLengths")
    assert len(set(lengths) - {0}) >= 3, f"the reply did not grow as it streamed: {lengths}"
    stats = texts(driver, ".message.assistant .stats")[0]
    assert "reply tokens" in stats and "tok/s" in stats

    set_field(driver, "max-tokens", "1500")
    by_id(driver, "input").send_keys("Write a very long story about a dragon.\n")  # greedy: 1,500 tokens and more
    wait_for(lambda: len(assistant_texts(driver)) == 2 and len(assistant_texts(driver)[1]) > 20, what="streaming")
    wait_for(lambda: smol_server.metric("vllm:num_requests_running") == 1, what="the request running")
    by_id(driver, "stop").click()
    wait_for(lambda: smol_server.metric("vllm:num_requests_running") == 0, seconds=30, what="the abort")
    wait_for(lambda: by_id(driver, "send").is_displayed(), what="the composer back")
    partial = assistant_texts(driver)[1]

    driver.refresh()
    wait_for(lambda: len(assistant_texts(driver)) == 2, what="the conversation after a reload")
    assert assistant_texts(driver)[1] == partial
    assert "Berlin" in assistant_texts(driver)[0]
    assert "stopped" in texts(driver, ".message.assistant .stats")[1]

    screenshot = tmp_path / "playground.png"
    driver.save_screenshot(str(screenshot))
    from PIL import Image

    with Image.open(screenshot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # not blank: text, buttons, two messages

    assert requested_hosts(driver) <= {"127.0.0.1"}
    assert console_errors(driver) == []


def test_regenerate_and_edit_and_resend(browser, smol_server):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(smol_server.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    by_id(driver, "toggle-settings").click()
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "12")
    by_id(driver, "input").send_keys("Say hello.\n")
    wait_for(lambda: by_id(driver, "send").is_displayed() and assistant_texts(driver), what="the reply")
    finished = smol_server.metric("vllm:request_success_total")
    driver.find_element(By.XPATH, "//button[text()='Regenerate']").click()
    wait_for(lambda: smol_server.metric("vllm:request_success_total") == finished + 1, what="the regenerated reply")
    wait_for(lambda: driver.find_elements(By.XPATH, "//button[text()='Regenerate']"), what="the page settled")
    assert len(assistant_texts(driver)) == 1 and assistant_texts(driver)[0]  # replaced, not added
    driver.find_element(By.XPATH, "//article[contains(@class,'user')]//button[text()='Edit']").click()
    editor = driver.find_element(By.CSS_SELECTOR, "article.user textarea")
    editor.clear()
    editor.send_keys("Which city is the capital of France?")
    driver.find_element(By.XPATH, "//button[text()='Save & send']").click()
    wait_for(lambda: by_id(driver, "send").is_displayed() and "Paris" in " ".join(assistant_texts(driver)),
             what="the answer to the edited question")
    users = texts(driver, ".message.user .body")
    assert users == ["Which city is the capital of France?"] and len(assistant_texts(driver)) == 1
    assert console_errors(driver) == []


def test_the_page_asks_for_the_key_when_keys_are_set(browser, keyed_server):
    driver = browser
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.url + "/").status_code == 200  # the page itself holds no secret
    driver.get(keyed_server.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait_for(lambda: by_id(driver, "key-dialog").is_displayed(), what="the key prompt")
    by_id(driver, "key-input").send_keys(f"{API_KEY}\n")
    wait_for(lambda: by_id(driver, "model-name").text == SMOL_NAME, what="the model name with the key")
    driver.refresh()  # the key is remembered
    wait_for(lambda: by_id(driver, "model-name").text == SMOL_NAME, what="the model name after a reload")
    assert not by_id(driver, "key-dialog").is_displayed()
    errors = [e for e in console_errors(driver) if "401" not in e]  # the first, keyless try is a 401 by design
    assert errors == []


def test_the_page_fits_a_phone_and_works_from_the_keyboard(browser, smol_server):
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.set_window_size(390, 844)
    try:
        driver.get(smol_server.url + "/")
        wait_for(lambda: by_id(driver, "model-name").text == SMOL_NAME, what="the model name")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert by_id(driver, "toggle-sidebar").is_displayed() and not by_id(driver, "new-chat").is_displayed()
        by_id(driver, "toggle-sidebar").click()
        wait_for(lambda: by_id(driver, "new-chat").is_displayed(), what="the sidebar")
        by_id(driver, "new-chat").send_keys(Keys.ENTER)  # a focused button answers the keyboard
        assert driver.switch_to.active_element == by_id(driver, "input")
        assert driver.execute_script("return document.activeElement.id") == "input"
    finally:
        driver.set_window_size(1280, 900)


def test_no_ui_turns_the_page_off(smol_loaded):
    engine = engine_for(smol_loaded)
    servers = serve(Settings(served_model_name=SMOL_NAME, ui=False), engine)
    server = next(servers)
    try:
        assert httpx.get(server.url + "/").status_code == 404
        assert httpx.get(server.url + "/playground/app.js").status_code == 404
    finally:
        next(servers, None)
        engine.shutdown()


def test_the_bundle_is_small_and_self_contained(smol_server):
    import gzip

    sizes = {}
    for asset in ("app.js", "app.css"):
        response = httpx.get(f"{smol_server.url}/playground/{asset}")
        assert response.status_code == 200
        sizes[asset] = len(gzip.compress(response.content))
    page = httpx.get(smol_server.url + "/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert sum(sizes.values()) + len(gzip.compress(page.content)) < 300 * 1024



MARKDOWN_SCRIPT = ["<think>", "\nPlanning the answer.", "\n</think>\n\n", "Here is **code**:\n\n", "```python\n",
                   "print('hi')\n", "```"]
thinker = scripted_fixture(MARKDOWN_SCRIPT, builtin_template("qwen3"))


def test_reasoning_folds_away_and_code_is_highlighted_with_a_copy_button(browser, thinker):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(thinker.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    wait_for(lambda: by_id(driver, "model-name").text == "scripted", what="the model name")
    by_id(driver, "input").send_keys("Show me code.\n")
    wait_for(lambda: by_id(driver, "send").is_displayed() and assistant_texts(driver), what="the reply")
    reasoning = driver.find_element(By.CSS_SELECTOR, ".message.assistant details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded
    thought = driver.find_element(By.CSS_SELECTOR, ".message.assistant details.reasoning > div")
    assert thought.get_attribute("textContent") == "Planning the answer."
    assert texts(driver, ".message.assistant .body strong") == ["code"]
    assert driver.find_elements(By.CSS_SELECTOR, ".message.assistant pre code.hljs.language-python .hljs-built_in")
    copy = driver.find_element(By.CSS_SELECTOR, ".message.assistant pre button.copy")
    copy.click()
    wait_for(lambda: copy.text == "Copied", what="the copy confirmation")
    assert console_errors(driver) == []
