"""The chat page in a real browser: Playwright driving Debian's Chromium, headless, offline.

The set-up installs Chromium from Debian's packages when it is missing (CI runs as root on
a fresh machine); the browser runs with background networking, component updates and sync
off, so it never tries to reach the internet. Screenshots are kept in tests/artifacts/.

One server (Gemma 3 270M, a base model without a chat template) and one page serve the whole
module, and the tests run in order on that page's state (its conversations in localStorage).
Gemma 270M does not think, so the thinking tests answer /v1/chat/completions from the browser
(Playwright's route) with a stream as llama.cpp's server (and this one: reasoning_content
deltas, tests/test_server_tools.py) sends it; everything else talks to the real server.
"""

import json
import os
import re
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
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server_url)
        page = context.new_page()
        page.requests = []  # every request the page makes, to check where they go
        page.on("request", lambda r: page.requests.append(r))
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(server_url + "/")
        yield page
        assert not page.errors, page.errors
        browser.close()


def wait_until(page, js: str, seconds: float):
    """Poll a JS expression from here: the page's CSP forbids eval, which wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(f"() => Boolean({js})"):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.1)


def answers_done(page, n: int, seconds: float = 90) -> None:
    """Wait until the page has finished its n-th answer since the test began (a new meta line)."""
    wait_until(page, f"window.__done >= {n}", seconds)


def count_answers(page) -> None:
    page.evaluate("""() => { window.__done = 0; new MutationObserver(() => {
        if (!document.body.classList.contains('busy') && window.__busy) window.__done += 1;
        window.__busy = document.body.classList.contains('busy');
    }).observe(document.body, {attributes: true}); window.__busy = false; }""")


def set_max_tokens(page, n: int) -> None:
    page.click("#toggle-settings")
    page.fill("#max-tokens", str(n))
    page.click("#toggle-settings")


def test_send_stream_stop_and_start_over(page):
    wait_until(page, "document.getElementById('model-name').textContent.includes('Gemma')", 30)
    # a base model: text completion, said so, on /v1/completions
    wait_until(page, "!document.getElementById('mode-note').hidden", 10)
    assert "no chat template" in page.inner_text("#mode-note")
    assert page.evaluate("fetch('/props').then(r => r.json())")["chat_template"] == ""
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
    assert [r.url for r in page.requests if r.method == "POST"] == [page.url.rstrip("/") + "/v1/completions"]
    assert page.inner_text(".msg.assistant .who") == "CONTINUATION"
    assert page.is_visible("#send") and not page.is_visible("#stop")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"))
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert "Private chat" in page.inner_text("#thread")


ATTACKS = """[a](javascript:window.pwned=1) [b](JAVASCRIPT:window.pwned=2) [c](data:text/html,x)
![d](x" onerror="window.pwned=3) <img src=x onerror="window.pwned=4"> <a href="javascript:x">e</a>
`<script>window.pwned=5</script>` **<svg onload="window.pwned=6">** [f](//evil.example/x)
| <img src=x onerror=window.pwned=7> | <iframe src="javascript:window.pwned=8"> |
|---|---|
| <script>window.pwned=9</script> | [g](vbscript:x) |

- <style>body{display:none}</style>
> <form action=x><input name=y></form>
"""


def test_markdown_that_tries_to_inject_stays_text(page):
    found = page.evaluate("""(md) => {
        const box = document.createElement('div');
        renderText(box, md);
        document.body.append(box);
        const out = {tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                     links: box.querySelectorAll('a').length, code: box.querySelector('code.inline').textContent,
                     text: box.textContent};
        box.remove();
        return out;
    }""", ATTACKS)
    page.wait_for_timeout(200)
    assert page.evaluate("window.pwned") is None
    assert set(found["tags"]) <= {"p", "code", "strong", "span", "div", "table", "thead", "tbody", "tr",
                                  "th", "td", "ul", "li", "blockquote"}, found["tags"]
    assert found["links"] == 0  # none of these addresses is http(s)
    assert found["code"] == "<script>window.pwned=5</script>"
    for shown in ("javascript:window.pwned=1", "<img src=x", "<svg onload", "<style>", "<form"):
        assert shown in found["text"]


def render(page, md: str) -> dict:
    return page.evaluate("""(md) => {
        const box = document.createElement('div');
        renderText(box, md);
        return {text: box.textContent, tags: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
                links: [...box.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.textContent]),
                code: [...box.querySelectorAll('pre code')].map(c => c.textContent),
                start: box.querySelector('ol')?.start};
    }""", md)


def test_markdown_edge_cases(page):
    plain = render(page, "snake_case_name and 2 * 3 * 4, \\*not em\\*")
    assert "em" not in plain["tags"] and plain["text"] == "snake_case_name and 2 * 3 * 4, *not em*"
    streaming = render(page, "Here:\n```js\nlet a = 1;")  # a fence not closed yet is code already
    assert streaming["code"] == ["let a = 1;"]
    assert render(page, "3. three\n4. four")["start"] == 3
    bare = render(page, "see https://example.com/a_b. or <https://example.org>")
    assert bare["links"] == [["https://example.com/a_b", "https://example.com/a_b"],
                             ["https://example.org/", "https://example.org"]]
    assert bare["text"] == "see https://example.com/a_b. or https://example.org"


MARKDOWN = """# Bread, in short

Bread needs **flour**, *water*, `salt` and ~~patience~~ yeast. See [the guide](https://example.com/bread).

1. Mix
2. Knead
   - ten minutes
   - by hand
3. Bake

| Step | Minutes |
|:-----|--------:|
| Rise | 60 |
| Bake | 35 |

> Good bread takes time.

```python
print("<b>bread</b>")
```
"""


def sse(chunks) -> str:
    """A chat stream as the server sends it: deltas, a last chunk with timings, usage, [DONE]."""
    events = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in chunks]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "timings": {"predicted_per_second": 42.5}})
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(chunks),
                                            "total_tokens": 5 + len(chunks)}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def answer_with(page, stream: str, question: str) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=stream))
    try:
        count_answers(page)
        page.fill("#input", question)
        page.press("#input", "Enter")
        answers_done(page, 1, 10)
    finally:
        page.unroute("**/v1/chat/completions")


def test_reasoning_content_shown_collapsed_above_markdown(page):
    page.click("#mode-switch")  # "Chat anyway"
    assert "built-in template" in page.inner_text("#mode-note")
    thinking = ["First, what does bread need?", " Flour and water.\n\nThen time."]
    answer = [MARKDOWN[i:i + 9] for i in range(0, len(MARKDOWN), 9)]  # split mid-token, as streams do
    answer_with(page, sse([{"reasoning_content": t} for t in thinking] + [{"content": a} for a in answer]),
                "How do I bake bread?")
    msg = page.locator(".msg.assistant").last
    think = msg.locator("details.think")
    assert think.is_visible() and not think.evaluate("d => d.open")
    assert think.locator("summary").inner_text() == "Thought (10 words)"
    assert not msg.locator(".think-body").is_visible()
    body = msg.locator(".body")
    assert body.locator("h1").inner_text() == "Bread, in short"
    assert body.locator("strong").inner_text() == "flour" and body.locator("em").inner_text() == "water"
    assert body.locator("code.inline").inner_text() == "salt" and body.locator("del").count() == 1
    link = body.locator("a")
    assert link.get_attribute("href") == "https://example.com/bread" and link.get_attribute("target") == "_blank"
    assert "noopener" in link.get_attribute("rel") and "noreferrer" in link.get_attribute("rel")
    assert body.locator("ol > li").count() == 3 and body.locator("ol > li ul > li").count() == 2
    assert body.locator("th").all_inner_texts() == ["Step", "Minutes"]
    assert body.locator("td").all_inner_texts() == ["Rise", "60", "Bake", "35"]
    assert body.locator("td").nth(1).evaluate("td => td.style.textAlign") == "right"
    assert body.locator("blockquote").inner_text() == "Good bread takes time."
    assert body.locator("pre code").inner_text() == 'print("<b>bread</b>")' and body.locator("b").count() == 0
    assert msg.locator(".meta").inner_text() == f"{len(answer) + 2} tokens · 42.5 tokens/s"
    think.locator("summary").click()
    assert msg.locator(".think-body").inner_text().startswith("First, what does bread need? Flour and water.")
    page.screenshot(path=str(ARTIFACTS / "chat_page_markdown.png"), full_page=False)
    body.locator(".code .copy").click()
    wait_until(page, "document.querySelector('.msg.assistant:last-of-type .copy').textContent === 'Copied'", 5)
    assert page.evaluate("navigator.clipboard.readText()") == 'print("<b>bread</b>")'


def test_leading_think_tag_is_split_out_of_the_content(page):
    page.click("#new-chat")
    answer_with(page, sse([{"content": c} for c in ["<thi", "nk>\nThe user greets me.", "\n</think>\n\n",
                                                    "Hello! How can I help?"]]), "Hi")
    msg = page.locator(".msg.assistant").last
    assert msg.locator(".body").inner_text() == "Hello! How can I help?"
    assert msg.locator("summary").inner_text() == "Thought (4 words)"
    assert msg.locator(".think-body").text_content() == "The user greets me."


def test_chat_regenerate_edit_and_tokens_per_second(page):
    page.click("#new-chat")
    set_max_tokens(page, 6)
    count_answers(page)
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    answers_done(page, 1)
    speed = re.compile(r"^\d+ tokens · \d+\.\d tokens/s")
    assert speed.match(page.locator(".msg.assistant .meta").inner_text())
    assert re.match(r"Last answer: \d+\.\d tokens/s", page.inner_text("#speed"))
    chats = lambda: [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    sent = len(chats())
    page.click(".msg.assistant .regen")
    answers_done(page, 2)
    assert len(chats()) == sent + 1 and page.locator(".msg.assistant").count() == 1
    assert [m["content"] for m in chats()[-1].post_data_json["messages"]] == ["Hello"]
    page.click(".msg.user .edit-btn")
    page.fill(".msg .edit textarea", "Hello there")
    page.press(".msg .edit textarea", "Enter")
    answers_done(page, 3)
    assert page.locator(".msg").count() == 2 and page.inner_text(".msg.user .body") == "Hello there"
    assert [m["content"] for m in chats()[-1].post_data_json["messages"]] == ["Hello there"]
    assert speed.match(page.locator(".msg.assistant .meta").inner_text())
    page.screenshot(path=str(ARTIFACTS / "chat_page_chat.png"))


def test_conversations_kept_in_the_browser(page, server_url):
    page.reload()
    wait_until(page, "document.querySelectorAll('#conversations .conv').length === 4", 10)
    titles = page.locator("#conversations .open").all_inner_texts()
    assert titles == ["Hello", "Hi", "How do I bake bread?", "Write a long story about a dragon who learns to bake bread."]
    page.click("#conversations .conv:nth-child(4) .open")  # the text-completion one reopens as such
    assert page.inner_text(".msg.user .body") == "Write a long story about a dragon who learns to bake bread."
    assert page.locator(".msg.assistant .meta").inner_text() == "Stopped."
    assert "no chat template" in page.inner_text("#mode-note")
    page.click("#conversations .conv:nth-child(3) .open")
    assert page.locator(".msg.assistant h1").inner_text() == "Bread, in short"
    page.click("#conversations .conv:nth-child(3) .rename")
    page.fill("#conversations input", "Baking")
    page.press("#conversations input", "Enter")
    page.click("#conversations .conv:nth-child(2) .delete")
    page.click("#conversations .conv:nth-child(2) .delete")  # "Delete?" asks once
    page.screenshot(path=str(ARTIFACTS / "chat_page_conversations.png"))
    page.reload()
    wait_until(page, "document.querySelectorAll('#conversations .conv').length === 3", 10)
    assert page.locator("#conversations .open").all_inner_texts()[:2] == ["Hello", "Baking"]
    stored = json.loads(page.evaluate("localStorage.getItem('modelrun.conversations')"))
    assert [c["title"] for c in stored][:2] == ["Hello", "Baking"]
    # nothing left the machine: every request went to this server
    assert all(r.url.startswith(server_url + "/") for r in page.requests), {r.url for r in page.requests}


def test_keyboard_shift_enter_escape_and_focus(page):
    page.click("#new-chat")
    set_max_tokens(page, 400)
    page.click("#input")
    page.keyboard.type("Once upon a time")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("there was")
    assert page.input_value("#input") == "Once upon a time\nthere was" and page.locator(".msg").count() == 0
    page.keyboard.press("Enter")
    wait_until(page, "(document.querySelector('.msg.assistant .body')?.textContent || '').length > 10", 60)
    # a reader who scrolled up to read is left there while the answer goes on
    page.evaluate("document.querySelector('.msg.assistant .body').style.minHeight = '2000px'")
    page.evaluate("document.getElementById('log').scrollTop = 0")
    length = page.evaluate("document.querySelector('.msg.assistant .body').textContent.length")
    wait_until(page, f"document.querySelector('.msg.assistant .body').textContent.length > {length}", 30)
    assert page.evaluate("document.getElementById('log').scrollTop") == 0
    page.keyboard.press("Escape")
    wait_until(page, "document.querySelector('.msg.assistant .meta')?.textContent === 'Stopped.'", 10)
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.press("Tab")
    focused = page.evaluate("""() => { const e = document.activeElement, s = getComputedStyle(e);
                                       return [e.id, s.outlineStyle, s.outlineWidth]; }""")
    assert focused == ["send", "solid", "2px"]


def test_dark_theme_follows_the_system(page):
    page.click("#conversations .open:text-is('Baking')")  # markdown, code and a table
    page.emulate_media(color_scheme="dark")
    try:
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 19, 23)"
        page.screenshot(path=str(ARTIFACTS / "chat_page_dark.png"))
    finally:
        page.emulate_media(color_scheme="light")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"


def test_model_text_cannot_run_script(page):
    created = page.evaluate("""() => {
        const box = document.createElement('div');
        renderText(box, 'hi <img src=x onerror="window.pwned = 1"> <script>window.pwned = 2</script>\\n```html\\n<b>x</b>\\n```');
        document.body.append(box);
        const out = {imgs: box.querySelectorAll('img, script, b').length,
                     code: box.querySelector('pre code').textContent, text: box.textContent};
        box.remove();
        return out;
    }""")
    page.wait_for_timeout(200)
    assert created["imgs"] == 0 and created["code"] == "<b>x</b>" and "<img" in created["text"]
    assert page.evaluate("window.pwned") is None


def test_a_model_with_a_chat_template_opens_in_chat(page):
    """/props of a templated model (tests/test_server.py checks the server gives it) opens chat."""
    page.route("**/props", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"chat_template": "{{ messages }}", "default_generation_settings": {"n_ctx": 1024}})))
    try:
        page.reload()
        wait_until(page, "document.getElementById('input').placeholder === 'Message the model'", 10)
        assert not page.is_visible("#mode-note") and "Write the beginning" not in page.inner_text("#thread")
    finally:
        page.unroute("**/props")
        page.reload()
    wait_until(page, "!document.getElementById('mode-note').hidden", 10)


def test_phone_sized_window_fits(page):
    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    assert not page.is_visible("#sidebar")
    page.screenshot(path=str(ARTIFACTS / "chat_page_phone.png"))
    page.click("#toggle-chats")
    assert page.is_visible("#sidebar") and page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "chat_page_phone_chats.png"))
    page.click("#conversations .conv:nth-child(3) .open")
    assert not page.is_visible("#sidebar") and page.locator(".msg.assistant h1").is_visible()
    page.click("#toggle-chats")
    page.keyboard.press("Escape")
    assert not page.is_visible("#sidebar") and page.evaluate("document.activeElement.id") == "toggle-chats"
