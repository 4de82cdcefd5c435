"""The web chat page of `lmlab serve` (lmlab/serve/static/chat.html) in a real headless Chromium.

The module builds a micro model (context 64 tokens), starts the real `python -m lmlab serve RUN_DIR
port=0` on it and drives the page served at `/` with Playwright. Streaming, Stop, the context
error and the API key run against the real server; the XSS, exact error-body and request-shape
cases answer /v1/chat/completions with `page.route`, so their replies are known. Skipped without
playwright or a Chromium binary (Debian's /usr/bin/chromium; Playwright's browser downloads are
not used).

LMLAB_WRITE_SCREENSHOT=1 writes the screenshot of a streamed exchange to docs/serve_chat.png.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)

CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
if not CHROMIUM:  # pragma: no cover - depends on the environment
    pytest.skip("no Chromium binary (/usr/bin/chromium or `chromium` on PATH; apt-get install chromium)",
                allow_module_level=True)

from conftest import ROOT, build_micro_pipeline  # noqa: E402
from serving import HTTP, serving  # noqa: E402

STREAM_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_micro_pipeline(tmp_path_factory.mktemp("m"))["model"]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The real `lmlab serve` on the micro model, no API key."""
    with serving(run_dir, tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        with HTTP.open(srv["url"] + "/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == [srv["model"]]
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 900, "height": 640})
    ctx.set_default_timeout(STREAM_TIMEOUT_MS)
    yield ctx
    ctx.close()


def shows_model(page, model: str):
    page.wait_for_function("id => document.getElementById('model-name').textContent === id", arg=model)


@pytest.fixture
def page(context, server):
    """The chat page, loaded from the server, with the model id shown (a fresh context each test)."""
    pg = context.new_page()
    pg.goto(server["url"] + "/")
    shows_model(pg, server["model"])
    return pg


def sse(*pieces: str, finish: str | None = "stop", done: bool = True, error: dict | None = None) -> str:
    """An SSE body as `lmlab serve` writes it: a role chunk, one chunk per piece, the finish chunk."""
    def chunk(delta, finish_reason=None):
        return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
    if finish:
        events.append(chunk({}, finish))
    if error:
        events.append({"error": error})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return body + ("data: [DONE]\n\n" if done else "")


def fulfil_sse(body: str, seen: list | None = None):
    def handler(route, request):
        if seen is not None:
            seen.append({"body": json.loads(request.post_data), "headers": request.headers})
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
    return handler


def wait_idle(page):
    page.wait_for_function("document.getElementById('messages').dataset.streaming === '0'")


def send(page, text: str, max_tokens: int | None = None, temperature: float | None = None):
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_assistant(page):
    return page.locator("#messages .msg.assistant").last


# Record the last assistant bubble's text each time it changes while #messages has
# data-streaming="1"; with `stop_at_first` the recorder clicks Stop at the first non-empty text.
RECORDER = """stopAtFirst => {
  window.__samples = []; window.__atStop = null;
  const msgs = document.getElementById('messages');
  new MutationObserver(() => {
    const bubbles = msgs.querySelectorAll('.msg.assistant');
    if (msgs.dataset.streaming !== '1' || !bubbles.length) return;
    const text = bubbles[bubbles.length - 1].textContent;
    if (text && text !== window.__samples[window.__samples.length - 1]) window.__samples.push(text);
    if (stopAtFirst && text && window.__atStop === null) {
      window.__atStop = text;
      document.getElementById('stop').click();
    }
  }).observe(msgs, {childList: true, subtree: true, characterData: true});
}"""


def test_page_streams_a_reply_from_the_real_server(server, page, tmp_path):
    assert page.title() == "lmlab chat"
    assert page.text_content("#model-name") == server["model"]
    requests = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.evaluate(RECORDER, False)
    page.fill("#system", "Be brief.")  # the micro model's context is 64 tokens: prompt + max_tokens fit
    send(page, "Hi", max_tokens=24, temperature=0.8)
    wait_idle(page)

    reply = last_assistant(page).text_content()
    samples = page.evaluate("window.__samples")
    chunks = page.evaluate("window.__chunks")
    # the reply grew over time: several distinct texts seen while streaming, each a prefix of the next
    assert chunks >= 2, (chunks, reply)
    assert len(samples) >= 2, samples
    for earlier, later in zip(samples, samples[1:] + [reply]):
        assert later.startswith(earlier) and len(later) >= len(earlier), (earlier, later)
    assert reply.strip()
    assert last_assistant(page).get_attribute("data-finish") in ("stop", "length")
    assert page.text_content("#messages .msg.user") == "Hi"
    assert page.locator("#messages .msg").count() == 2
    assert page.text_content("#error") == ""
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert len(requests) == 1
    body = requests[0]
    assert body["model"] == server["model"] and body["stream"] is True
    assert body["max_tokens"] == 24 and body["temperature"] == pytest.approx(0.8)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    shot = (ROOT / "docs" / "serve_chat.png" if os.environ.get("LMLAB_WRITE_SCREENSHOT") == "1"
            else tmp_path / "serve_chat.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000


def seeded(page, seed: int) -> None:
    """The page's chat requests go out with `seed` added: the sampled reply is the same every run."""
    def handler(route, request):
        route.continue_(post_data=json.dumps({**json.loads(request.post_data), "seed": seed}))
    page.route("**/v1/chat/completions", handler)


def test_stop_keeps_the_partial_reply_and_the_server_goes_on(server, page):
    seeded(page, 0)  # unseeded, the micro model sometimes ends its reply at the first token: nothing to stop
    page.evaluate(RECORDER, True)
    send(page, "Hi", max_tokens=40, temperature=1.0)
    wait_idle(page)
    at_stop = page.evaluate("window.__atStop")
    reply = last_assistant(page)
    assert at_stop, "no text arrived before the stream ended"
    # Stop ended the stream at once: nothing was appended after the click, the partial text stays
    assert reply.text_content() == at_stop
    assert reply.get_attribute("data-finish") == "stopped"
    assert page.text_content("#error") == ""
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # the server is still healthy and serves the next conversation ("New chat" clears the page)
    with HTTP.open(server["url"] + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0
    send(page, "Hi", max_tokens=8)
    wait_idle(page)
    assert page.locator("#messages .msg").count() == 2
    assert last_assistant(page).text_content().strip()
    assert last_assistant(page).get_attribute("data-finish") in ("stop", "length")


def test_model_and_user_text_render_as_text_never_html(page):
    script = "<script>window.__xss=1</script>"
    img = '<img src=x onerror="window.__xss=2">'
    page.route("**/v1/chat/completions", fulfil_sse(sse(script, img)))
    user_text = '<b>bold</b><img src=y onerror="window.__xss=3">'
    send(page, user_text)
    wait_idle(page)
    page.wait_for_timeout(300)  # time for an <img onerror> to fire, had one been parsed
    assert last_assistant(page).text_content() == script + img
    assert page.text_content("#messages .msg.user") == user_text
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.evaluate("[...document.querySelectorAll('#messages .msg')].map(m => m.children.length)") == [0, 0]
    assert page.locator("#messages img, #messages script, #messages b").count() == 0


def test_errors_show_in_the_page(page):
    # the real server refuses a completion longer than the context (64 tokens): its 400 shows
    send(page, "Hi", max_tokens=200)
    page.wait_for_function("document.getElementById('error').textContent.startsWith('Error 400')", timeout=10_000)
    assert "context" in page.text_content("#error")
    wait_idle(page)
    # the failed turn is dropped and its text given back to resend
    assert page.locator("#messages .msg").count() == 0
    assert page.input_value("#input") == "Hi"

    # an OpenAI error body, exactly
    error = {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens",
             "code": None}
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=400, content_type="application/json",
                                           body=json.dumps({"error": error})))
    send(page, "Hello", max_tokens=100000)
    page.wait_for_function("document.getElementById('error').textContent.includes('max_tokens is too large')",
                           timeout=10_000)
    wait_idle(page)
    assert page.is_visible("#error")
    assert page.text_content("#error").startswith("Error 400")
    assert page.locator("#messages .msg").count() == 0

    # an error event mid-stream: the message shows and the partial reply stays
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", fulfil_sse(sse("partial ", "text", finish=None, done=False, error={
        "message": "generation failed: out of memory", "type": "server_error", "param": None, "code": None})))
    send(page, "Again", max_tokens=16)
    page.wait_for_function("document.getElementById('error').textContent.includes('generation failed')",
                           timeout=10_000)
    wait_idle(page)
    assert last_assistant(page).text_content() == "partial text"
    assert page.text_content("#messages .msg.user") == "Again"


def test_history_settings_and_api_key_are_sent(page, server):
    seen: list = []
    page.route("**/v1/chat/completions", fulfil_sse(sse("Hi", " there."), seen))
    page.fill("#api-key", "s3cret")
    page.dispatch_event("#api-key", "change")
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")  # a newline, not a send
    page.type("#input", "second line")
    assert page.input_value("#input") == "first line\nsecond line" and not seen
    page.press("#input", "Enter")
    wait_idle(page)
    send(page, "And then?", max_tokens=7, temperature=0)
    wait_idle(page)
    assert len(seen) == 2
    assert seen[1]["body"]["messages"] == [{"role": "user", "content": "first line\nsecond line"},
                                           {"role": "assistant", "content": "Hi there."},
                                           {"role": "user", "content": "And then?"}]
    assert seen[1]["body"]["max_tokens"] == 7 and seen[1]["body"]["temperature"] == 0
    assert seen[0]["body"]["max_tokens"] == 256 and seen[0]["body"]["temperature"] == pytest.approx(0.7)
    assert all(s["headers"].get("authorization") == "Bearer s3cret" for s in seen)
    assert [m.text_content() for m in page.locator("#messages .msg").all()] == [
        "first line\nsecond line", "Hi there.", "And then?", "Hi there."]

    # the key persists (localStorage); "New chat" clears the history sent next
    page.reload()
    shows_model(page, server["model"])
    assert page.input_value("#api-key") == "s3cret"
    page.click("#new-chat")
    send(page, "Fresh start")
    wait_idle(page)
    assert seen[-1]["body"]["messages"] == [{"role": "user", "content": "Fresh start"}]


def test_a_server_with_an_api_key(run_dir, tmp_path, context):
    """The real server with api_key=: the page itself loads without the key, /v1 needs it."""
    with serving(run_dir, tmp_path / "serve.log", "api_key=k3y-for-test") as srv:
        page = context.new_page()
        page.goto(srv["url"] + "/")
        page.wait_for_function("document.getElementById('error').textContent.includes('401')", timeout=10_000)
        assert page.text_content("#model-name") != srv["model"]
        page.fill("#api-key", "k3y-for-test")
        page.dispatch_event("#api-key", "change")
        shows_model(page, srv["model"])
        assert page.text_content("#error") == ""
        send(page, "Hi", max_tokens=8)
        wait_idle(page)
        assert page.text_content("#error") == ""
        assert last_assistant(page).text_content().strip()
        page.reload()  # the key is remembered
        shows_model(page, srv["model"])
        assert page.input_value("#api-key") == "k3y-for-test"
