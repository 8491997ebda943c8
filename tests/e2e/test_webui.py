"""The chat page at /chat in a real Chromium, against the real api_server serving SmolLM2."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHAT_URL_GLOB = "**/v1/chat/completions"


# ---- helpers ---------------------------------------------------------------


def open_settings(page: Any) -> None:
    if not page.locator("#settings").evaluate("details => details.open"):
        page.locator("#settings summary").click()


def set_field(page: Any, selector: str, value: str) -> None:
    """Types into a settings field and leaves it, as a user does (fires `change`)."""
    open_settings(page)
    page.locator(selector).fill(value)
    page.locator(selector).press("Tab")


def enter_api_key(page: Any, key: str) -> None:
    set_field(page, "#api-key", key)
    page.wait_for_function(
        "() => document.querySelector('#model').options.length > 0 || "
        "document.querySelector('#server-status').classList.contains('error')"
    )


def send(page: Any, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def wait_idle(page: Any, timeout_s: float = 120.0) -> None:
    page.wait_for_function("() => !document.body.classList.contains('busy')", timeout=timeout_s * 1000)


def assistant_texts(page: Any) -> list[str]:
    return page.locator(".message.assistant .bubble").all_inner_texts()


def sse_body(pieces: list[str], completion_tokens: int | None = None) -> str:
    """A /v1/chat/completions stream in the server's format, for route.fulfill."""
    events = [
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "smollm2",
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        for piece in pieces
    ]
    if completion_tokens is not None:
        events.append(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "smollm2",
                "choices": [],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": completion_tokens,
                    "total_tokens": completion_tokens + 3,
                },
            }
        )
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


def fulfill_sse(body: str) -> Any:
    return lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)


def chat_request_bodies(page: Any) -> list[dict[str, Any]]:
    """Starts recording the JSON bodies the page posts to /v1/chat/completions."""
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda request: (
            bodies.append(json.loads(request.post_data))
            if request.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    return bodies


def streamed_text(sse: str) -> str:
    """The reply text carried by an SSE body, concatenated from its deltas."""
    text = ""
    for line in sse.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: ") :]).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def wait_until(predicate: Any, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def has_no_horizontal_overflow(page: Any) -> bool:
    return page.evaluate(
        "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        " && document.body.scrollWidth <= document.documentElement.clientWidth"
    )


# ---- tests against the real model -------------------------------------------


def test_reply_streams_in_token_by_token(page: Any, server: Any, artifacts: Path) -> None:
    bodies = chat_request_bodies(page)
    enter_api_key(page, server.api_key)
    assert page.locator("#model").input_value() == "smollm2"
    set_field(page, "#max-tokens", "40")
    set_field(page, "#temperature", "0")  # greedy: SmolLM2 then answers with Paris, as HF transformers does
    send(page, "What is the capital of France?")

    bubble = page.locator(".message.assistant.streaming .bubble")
    bubble.wait_for()
    lengths: list[int] = []
    while page.locator(".message.assistant.streaming").count():
        lengths.append(
            len(page.evaluate("() => document.querySelector('.message.assistant .bubble').textContent"))
        )
        time.sleep(0.03)
    wait_idle(page)

    growth = sorted(set(length for length in lengths if length > 0))
    assert len(growth) >= 3, f"the reply did not grow over time, text lengths seen: {lengths}"
    reply = assistant_texts(page)[0]
    assert "Paris" in reply
    meta = page.locator(".message.assistant .meta").inner_text()
    assert re.fullmatch(r"\d+ tokens · \d+\.\d tokens/s", meta), meta
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["max_tokens"] == 40 and bodies[0]["temperature"] == 0
    page.screenshot(path=str(artifacts / "webui-real-reply.png"))


def test_every_turn_sends_the_whole_conversation(page: Any, server: Any) -> None:
    bodies = chat_request_bodies(page)
    enter_api_key(page, server.api_key)
    set_field(page, "#system-prompt", "You are a terse assistant.")
    set_field(page, "#max-tokens", "16")
    streams: list[str] = []

    def record_stream(route: Any) -> None:  # buffers the reply: this test is about what is sent
        response = route.fetch()
        streams.append(response.text())
        route.fulfill(response=response)

    page.route(CHAT_URL_GLOB, record_stream)
    send(page, "My name is Ada.")
    wait_idle(page)
    first_reply = streamed_text(streams[0])
    assert first_reply
    send(page, "What is my name?")
    wait_idle(page)

    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "What is my name?"},
    ]
    assert len(assistant_texts(page)) == 2


def test_stop_ends_a_long_reply_and_frees_the_request(page: Any, server: Any) -> None:
    def force_long_reply(route: Any) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route(CHAT_URL_GLOB, force_long_reply)
    enter_api_key(page, server.api_key)
    set_field(page, "#max-tokens", "4000")
    send(page, "Write a very long story about a dragon.")

    page.wait_for_function(
        "() => (document.querySelector('.message.assistant .bubble')?.textContent || '').length > 20"
    )
    assert server.engine.stats().num_running == 1
    page.locator("#stop").click()
    wait_idle(page, timeout_s=10)

    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert "stopped" in page.locator(".message.assistant .meta").inner_text()
    wait_until(
        lambda: server.engine.stats().num_running == 0, 10, "the engine still runs the aborted request"
    )
    text_after_stop = assistant_texts(page)[0]
    time.sleep(0.5)
    assert assistant_texts(page)[0] == text_after_stop, "text kept arriving after Stop"
    assert len(text_after_stop) < 4000


def test_wrong_api_key_shows_the_servers_error(page: Any, server: Any) -> None:
    enter_api_key(page, "not-the-key")
    assert "API key" in page.locator("#server-status").inner_text()
    send(page, "Hello?")
    wait_idle(page)
    error = page.locator(".message.error .bubble").inner_text()
    assert error.startswith("Server error 401:") and "API key in Settings" in error
    assert page.locator(".message.assistant").count() == 0


def test_conversations_persist_across_reload_and_can_be_deleted(page: Any, server: Any) -> None:
    enter_api_key(page, server.api_key)
    set_field(page, "#max-tokens", "8")
    send(page, "First chat: say hi.")
    wait_idle(page)
    page.locator("#new-chat").click()
    assert page.locator(".message").count() == 0
    send(page, "Second chat: say bye.")
    wait_idle(page)

    page.reload()
    titles = page.locator(".conversation-open").all_inner_texts()
    assert titles == ["Second chat: say bye.", "First chat: say hi."]
    assert page.locator(".message.user .bubble").all_inner_texts() == ["Second chat: say bye."]
    assert page.locator("#api-key").input_value() == server.api_key
    assert page.locator("#max-tokens").input_value() == "8"

    page.locator(".conversation-open", has_text="First chat").click()
    assert page.locator(".message.user .bubble").all_inner_texts() == ["First chat: say hi."]
    assert page.locator("#chat-title").inner_text() == "First chat: say hi."
    page.locator(".conversation", has_text="Second chat").locator(".conversation-delete").click()
    page.reload()
    assert page.locator(".conversation-open").all_inner_texts() == ["First chat: say hi."]
    assert len(assistant_texts(page)) == 1


# ---- page behaviour with a scripted server reply (route interception) ----------


def test_markdown_renders_and_html_in_model_output_never_runs(
    page: Any, server: Any, artifacts: Path
) -> None:
    pieces = [
        "Here is **Python**:\n\n``",
        "`python\ndef add(a, b):\n    return a + b\n```\n\n",
        "- one\n- `two`\n\n<scr",
        "ipt>window.__pwned = 1</script>",
        '<img src="x" onerror="window.__pwned = 2"> [click](javascript:window.__pwned=3)',
    ]
    page.route(CHAT_URL_GLOB, fulfill_sse(sse_body(pieces, completion_tokens=42)))
    enter_api_key(page, server.api_key)
    send(page, "Show me some code")
    wait_idle(page)

    bubble = page.locator(".message.assistant .bubble")
    assert bubble.locator("pre code.language-python").inner_text() == "def add(a, b):\n    return a + b"
    assert bubble.locator("strong").inner_text() == "Python"
    assert bubble.locator("li").all_inner_texts() == ["one", "two"]
    assert bubble.locator("script, img, iframe, [onerror]").count() == 0
    assert bubble.locator("a").count() == 0
    assert "<script>window.__pwned = 1</script>" in bubble.inner_text()
    assert '<img src="x" onerror="window.__pwned = 2">' in bubble.inner_text()
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator(".message.assistant .meta").inner_text().startswith("42 tokens · ")
    page.screenshot(path=str(artifacts / "webui-desktop.png"))


@pytest.mark.parametrize(
    ("markdown", "html"),
    [
        ("my_var_name and a__b__c stay as written", "<p>my_var_name and a__b__c stay as written</p>"),
        (
            "```js\nlet a = 1 < 2",
            '<pre data-lang="js"><code class="language-js">let a = 1 &lt; 2</code></pre>',
        ),
        ("- a\n  - b\n- c", "<ul><li><p>a</p><ul><li>b</li></ul></li><li>c</li></ul>"),
        ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
        ("# Title\n> *quoted*", "<h1>Title</h1><blockquote><p><em>quoted</em></p></blockquote>"),
        ("line one\nline two", "<p>line one<br>line two</p>"),
        (
            "[docs](https://example.com/a?b=1&c=2)",
            '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">docs</a></p>',
        ),
        (
            "[x](javascript:alert(1)) [y](data:text/html,hi)",
            "<p>[x](javascript:alert(1)) [y](data:text/html,hi)</p>",
        ),
        ("a `<b>` and ``x`y``", "<p>a <code>&lt;b&gt;</code> and <code>x`y</code></p>"),
    ],
)
def test_markdown_renderer(page: Any, markdown: str, html: str) -> None:
    rendered = page.evaluate(
        "text => { const d = document.createElement('div'); d.append(Markdown.render(text));"
        " return d.innerHTML; }",
        markdown,
    )
    assert rendered == html


def test_error_body_from_the_server_is_shown(page: Any, server: Any) -> None:
    error = {
        "error": {
            "message": "max_tokens: must be >= 1",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }
    page.route(
        CHAT_URL_GLOB,
        lambda route: route.fulfill(status=400, content_type="application/json", body=json.dumps(error)),
    )
    enter_api_key(page, server.api_key)
    send(page, "Hi")
    wait_idle(page)
    assert (
        page.locator(".message.error .bubble").inner_text() == "Server error 400: max_tokens: must be >= 1."
    )


def test_error_in_the_middle_of_a_stream_is_shown(page: Any, server: Any) -> None:
    body = sse_body(["Partial "])
    body = body.replace(
        "data: [DONE]\n\n",
        'data: {"error": {"message": "engine failed", "type": "internal_server_error"}}\n\n',
    )
    page.route(CHAT_URL_GLOB, fulfill_sse(body))
    enter_api_key(page, server.api_key)
    send(page, "Hi")
    wait_idle(page)
    assert assistant_texts(page) == ["Partial"]
    assert page.locator(".message.error .bubble").inner_text() == "Server error: engine failed"


def test_unreachable_server_is_reported(page: Any, server: Any) -> None:
    page.route(CHAT_URL_GLOB, lambda route: route.abort("connectionrefused"))
    enter_api_key(page, server.api_key)
    send(page, "Hi")
    wait_idle(page)
    assert "Cannot reach the server" in page.locator(".message.error .bubble").inner_text()


def test_enter_sends_and_shift_enter_adds_a_line(page: Any, server: Any) -> None:
    bodies = chat_request_bodies(page)
    page.route(CHAT_URL_GLOB, fulfill_sse(sse_body(["ok"], completion_tokens=1)))
    enter_api_key(page, server.api_key)
    page.locator("#prompt").click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert bodies == []
    page.keyboard.press("Enter")
    wait_idle(page)
    assert bodies[0]["messages"][-1] == {"role": "user", "content": "line one\nline two"}
    assert page.locator("#prompt").input_value() == ""


def test_phone_sized_screen_has_no_horizontal_overflow(phone_page: Any, server: Any, artifacts: Path) -> None:
    page = phone_page
    long_line = "A_very_long_unbroken_token_" * 12
    pieces = [f"Sure.\n\n```\n{long_line}\n```\n\n{long_line}\n\n| a | b |\n|---|---|\n| 1 | 2 |"]
    page.route(CHAT_URL_GLOB, fulfill_sse(sse_body(pieces, completion_tokens=30)))
    assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < 0

    page.locator("#toggle-sidebar").click()
    page.wait_for_timeout(300)
    assert page.locator("#sidebar").bounding_box()["x"] >= 0
    enter_api_key(page, server.api_key)
    page.screenshot(path=str(artifacts / "webui-phone-menu.png"))
    page.locator("#scrim").click(position={"x": 370, "y": 400})
    page.wait_for_timeout(300)

    send(page, "Tell me something wide " + long_line)
    wait_idle(page)
    assert has_no_horizontal_overflow(page)
    prompt_box, send_box = page.locator("#prompt").bounding_box(), page.locator("#send").bounding_box()
    assert send_box["x"] + send_box["width"] <= 390 and prompt_box["width"] > 200
    page.screenshot(path=str(artifacts / "webui-phone.png"))
