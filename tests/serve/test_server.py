"""The real server (uvicorn + SmolLM2) against httpx and the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL_NAME, RunningServer, wait_until

from lmserve.engine.client import ChatTokenizer, EngineClient

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL_NAME)
    body.setdefault("messages", HELLO)
    body.setdefault("max_tokens", 12)
    return client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list[Any]:
    lines = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_models_lists_the_served_model(client: httpx.Client, engine: Any) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert data["data"][0]["id"] == MODEL_NAME
    assert data["data"][0]["owned_by"] == "lmserve"
    assert data["data"][0]["max_model_len"] == engine.session_len


def test_real_engine_is_an_engine_client(engine: Any) -> None:
    assert isinstance(engine, EngineClient) and isinstance(engine.tokenizer, ChatTokenizer)


def test_completion_prompt_with_a_lone_surrogate_is_400(client: httpx.Client) -> None:
    body = json.dumps({"prompt": "\ud800", "max_tokens": 2}).encode()  # httpx's json= cannot write it
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    error = response.json()["error"]
    assert error["param"] == "prompt"


def test_logit_bias_and_min_tokens_are_accepted(client: httpx.Client) -> None:
    response = chat(client, temperature=0, max_tokens=3, min_tokens=3, logit_bias={"0": -100})
    assert response.status_code == 200, response.text


def test_logit_bias_steers_and_bans_tokens(client: httpx.Client, engine: Any) -> None:
    banana = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = chat(client, temperature=0, max_tokens=3, logit_bias={str(banana): 100}).json()
    assert forced["choices"][0]["message"]["content"] == engine.tokenizer.decode([banana] * 3)
    plain = chat(client, temperature=0, max_tokens=8).json()["choices"][0]["message"]["content"]
    first = engine.tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = chat(client, temperature=0, max_tokens=8, logit_bias={str(first): -100}).json()
    assert (
        not engine.tokenizer.encode(banned["choices"][0]["message"]["content"], add_special_tokens=False)[0]
        == first
    )


def test_openai_client_chat_answers_paris(server: RunningServer) -> None:
    oa = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    result = oa.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert "Paris" in (result.choices[0].message.content or "")
    assert result.choices[0].finish_reason in ("stop", "length")
    assert (
        result.usage is not None
        and result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    )
    assert result.usage.prompt_tokens_details is not None


def test_stream_equals_non_stream_at_temperature_zero(server: RunningServer) -> None:
    oa = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    args: dict[str, Any] = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 16, "temperature": 0}
    whole = oa.chat.completions.create(**args)
    chunks = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_sse_wire_format(client: httpx.Client) -> None:
    response = chat(client, stream=True, temperature=0, max_tokens=4)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events[:-1])


def test_multi_turn_system_and_text_parts(client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}],
        },
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    response = chat(client, messages=messages, temperature=0)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_stop_string_cuts_the_answer(client: httpx.Client) -> None:
    plain = chat(client, temperature=0, max_tokens=16).json()["choices"][0]["message"]["content"]
    assert "Paris" in plain
    stopped = chat(client, temperature=0, max_tokens=16, stop=["Paris"]).json()["choices"][0]
    assert stopped["message"]["content"] == plain[: plain.index("Paris")]
    assert stopped["finish_reason"] == "stop"


def test_max_tokens_gives_length(client: httpx.Client) -> None:
    data = chat(client, temperature=0, max_completion_tokens=3).json()
    assert data["usage"]["completion_tokens"] == 3
    assert data["choices"][0]["finish_reason"] == "length"


def test_n_and_seed(client: httpx.Client) -> None:
    first = chat(client, n=2, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True).json()
    again = chat(client, n=2, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 16  # 8 per choice
    assert first["usage"]["prompt_tokens"] == chat(client, max_tokens=1).json()["usage"]["prompt_tokens"]


def test_chat_logprobs(client: httpx.Client) -> None:
    data = chat(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3).json()
    choice = data["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_completions_with_openai_client(server: RunningServer) -> None:
    oa = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    result = oa.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert "Paris" in result.choices[0].text
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and "".join(logprobs.tokens or []) == result.choices[0].text
    assert logprobs.text_offset == [0] + [len("".join((logprobs.tokens or [])[:i])) for i in range(1, 4)]


def test_completions_prompt_shapes_and_echo(client: httpx.Client, engine: Any) -> None:
    ids = engine.tokenizer.encode("The capital of France is")
    body = {"model": MODEL_NAME, "max_tokens": 3, "temperature": 0}
    by_text = client.post("/v1/completions", json={**body, "prompt": "The capital of France is"}).json()
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    many = client.post("/v1/completions", json={**body, "prompt": ["Hello", "One, two,"]}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    echoed = client.post(
        "/v1/completions", json={**body, "prompt": "The capital of France is", "echo": True}
    ).json()
    assert echoed["choices"][0]["text"] == "The capital of France is" + by_text["choices"][0]["text"]


def test_completions_stream(client: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole


def test_encode(client: httpx.Client, engine: Any) -> None:
    data = client.post("/v1/encode", json={"input": "Hello world"}).json()
    assert data["input_ids"] == engine.tokenizer.encode("Hello world") and data["length"] == len(
        data["input_ids"]
    )
    batch = client.post("/v1/encode", json={"input": ["a", "b c"]}).json()
    assert batch["length"] == [len(x) for x in batch["input_ids"]]


def test_health_and_openapi(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/encode"} <= set(paths)


def test_swagger_page_is_served_offline(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert not re.search(r"https?://", page.text.replace("http-equiv", "")), (
        "the page must not load from a CDN"
    )
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 500, asset


BAD_REQUESTS: list[tuple[dict[str, Any] | bytes, int, str | None]] = [
    (b"{not json", 400, None),
    ({"model": MODEL_NAME}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": HELLO, "temperature": 3}, 400, "temperature"),
    ({"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ({"messages": HELLO, "n": 0}, 400, "n"),
    ({"messages": HELLO, "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": HELLO, "presence_penalty": 5}, 400, "presence_penalty"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (
        {
            "messages": HELLO,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}],
        },
        400,
        "tools.0.function.parameters",
    ),
    (
        {
            "messages": HELLO,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/no"}}},
        },
        400,
        "response_format",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content.0.type",
    ),
    ({"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ({"messages": HELLO, "max_tokens": 10**6}, 400, "max_tokens"),
    # invalid Unicode would reach the real tokenizer (a TypeError there): 400 naming the field
    (
        json.dumps({"messages": [{"role": "user", "content": "hi \ud800"}]}).encode(),
        400,
        "messages.0.content",
    ),
    (json.dumps({"messages": HELLO, "stop": "\ud800"}).encode(), 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400, "messages.0.content"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
        400,
        "repetition_penalty",
    ),
    ({"messages": HELLO, "repetition_penalty": 1e30}, 400, "repetition_penalty"),
    ({"messages": HELLO, "seed": 2**64}, 400, "seed"),
    ({"messages": HELLO, "logit_bias": {"10000000": 1}}, 400, "logit_bias"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_openai_error(client: httpx.Client, body: Any, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        response = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert client.get("/health").status_code == 200  # still answering


def test_context_length_error_says_the_limit(client: httpx.Client, engine: Any) -> None:
    error = chat(client, max_tokens=engine.session_len).json()["error"]
    assert error["code"] == "context_length_exceeded" and str(engine.session_len) in error["message"]


def test_completions_bad_input(client: httpx.Client) -> None:
    suffix = client.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert suffix.status_code == 400 and suffix.json()["error"]["param"] == "suffix"
    assert "not supported" in suffix.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": []}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": [10**9]}).status_code == 400


def test_oversized_body_is_413(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_32_concurrent_streams(server: RunningServer) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 6, "stream": True}
        response = await http.post("/v1/chat/completions", json=body)
        events = sse_events(response.text)
        assert events[-1] == "[DONE]", response.text
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)))

    assert len(asyncio.run(main())) == 32


def test_disconnect_mid_stream_frees_blocks(server: RunningServer, engine: Any) -> None:
    total = engine.stats().num_total_blocks
    body = {"messages": HELLO, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert engine.stats().num_free_blocks < total
    assert wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks == total)


def test_abort_request_route(server: RunningServer, client: httpx.Client) -> None:
    assert client.post("/abort_request", json={"request_id": "chatcmpl-nope"}).status_code == 404
    body = {"messages": HELLO, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            aborted = client.post("/abort_request", json={"request_id": first["id"]}).json()["aborted"]
            assert aborted == [first["id"]]
            events = sse_events("\n\n".join(lines) + "\n\n")
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "abort"


def test_metrics_move_by_the_right_amounts(client: httpx.Client) -> None:
    def sample(name: str, labels: str = "") -> float:
        text = client.get("/metrics").text
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    ok = '{route="/v1/chat/completions",status="200"}'
    before = {n: sample(n) for n in ("lmserve_prompt_tokens_total", "lmserve_generation_tokens_total")}
    before_ok = sample("lmserve_requests_total", ok)
    before_ttft = sample("lmserve_time_to_first_token_seconds_count")
    usage = chat(client, temperature=0, max_tokens=5, ignore_eos=True).json()["usage"]
    assert (
        sample("lmserve_prompt_tokens_total") - before["lmserve_prompt_tokens_total"]
        == usage["prompt_tokens"]
    )
    assert sample("lmserve_generation_tokens_total") - before["lmserve_generation_tokens_total"] == 5
    assert sample("lmserve_requests_total", ok) - before_ok == 1
    assert sample("lmserve_time_to_first_token_seconds_count") - before_ttft == 1
    text = client.get("/metrics").text
    for name in (
        "lmserve_num_requests_running",
        "lmserve_num_requests_waiting",
        "lmserve_kv_cache_usage_perc",
    ):
        assert name in text
    assert "lmserve_prefix_cache_hit_rate" in text and "lmserve_e2e_request_latency_seconds_bucket" in text


def test_api_keys(keyed_server: RunningServer) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert http.get("/metrics").status_code == 401
        for open_path in ("/health", "/", "/openapi.json", "/static/swagger-ui.css"):
            assert http.get(open_path).status_code == 200, open_path
    oa = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key=API_KEY)
    assert oa.models.list().data[0].id == MODEL_NAME
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="bad").models.list()


def test_cors(keyed_server: RunningServer) -> None:
    origin = {"Origin": "http://allowed.example"}
    with httpx.Client(base_url=keyed_server.base_url) as http:
        preflight = http.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://allowed.example"
        assert (
            http.get("/health", headers=origin).headers["access-control-allow-origin"]
            == "http://allowed.example"
        )
        assert (
            "access-control-allow-origin"
            not in http.get("/health", headers={"Origin": "http://evil.example"}).headers
        )
