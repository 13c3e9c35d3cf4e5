"""The chat page in a real browser: Playwright driving Debian's Chromium, headless, offline.

The set-up installs Chromium from Debian's packages when it is missing (CI runs as root on
a fresh machine); the browser runs with background networking, component updates and sync
off, so it never tries to reach the internet. A screenshot is kept in tests/artifacts/.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import READY_LIMIT_S, wait_until_serving

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


def chromium_path() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and this user cannot install it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env,
                   capture_output=True, timeout=900)
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(gemma_path, spawn_for_module, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("chat_page") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = spawn_for_module([sys.executable, "-m", "runtime", "-m", str(gemma_path), "--port",
                                 str(port), "--nobrowser", "-c", "1024"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    wait_until_serving(proc, port, log=log.read_text)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=READY_LIMIT_S)


@pytest.fixture(scope="module")
def page(server_url):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server_url + "/")
        yield page
        browser.close()


def wait_until(page, js: str, seconds: float):
    """Poll a JS expression from here: the page's CSP forbids eval, which wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(f"() => Boolean({js})"):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.1)


def test_send_stream_stop_and_start_over(page):
    wait_until(page, "document.getElementById('model-name').textContent.includes('Gemma')", 30)
    page.fill("#input", "Write a long story about a dragon who learns to bake bread.")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant .body")
    wait_until(page, "(document.querySelector('.msg.assistant .body')?.textContent || '').length > 20", 60)
    first = len(answer.inner_text())
    # still streaming in: more text comes (slowly when the machine is busy)
    wait_until(page, f"document.querySelector('.msg.assistant .body').innerText.length > {first}", 30)
    assert page.is_visible("#stop")
    page.click("#stop")
    wait_until(page, "document.querySelector('.msg.assistant .meta')?.textContent === 'Stopped.'", 10)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"))
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert "Private chat" in page.inner_text("#thread")


def test_model_text_cannot_run_script(page):
    created = page.evaluate("""() => {
        const box = document.createElement('div');
        renderText(box, 'hi <img src=x onerror="window.pwned = 1"> <script>window.pwned = 2</script>\\n```html\\n<b>x</b>\\n```');
        document.body.append(box);
        return {imgs: box.querySelectorAll('img, script, b').length, code: box.querySelector('pre code').textContent,
                text: box.textContent};
    }""")
    page.wait_for_timeout(200)
    assert created["imgs"] == 0 and created["code"] == "<b>x</b>" and "<img" in created["text"]
    assert page.evaluate("window.pwned") is None


def test_phone_sized_window_fits(page):
    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    page.screenshot(path=str(ARTIFACTS / "chat_page_phone.png"))
