"""A terminal chat client for any OpenAI-compatible server (`lmserve serve api_client URL`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TextIO

import httpx


class ChatClient:
    """Streams answers, keeps the conversation; `end` starts over, `exit` quits."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0))
        self.model = model
        self.options = {
            k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None
        }
        self.history: list[dict[str, str]] = []

    def close(self) -> None:
        self.http.close()

    def model_name(self) -> str:
        if self.model is None:
            response = self._checked(self.http.get(f"{self.base_url}/models"))
            self.model = str(response.json()["data"][0]["id"])
        return self.model

    def stream_answer(self, user_text: str) -> Iterator[str]:
        """Send the conversation plus `user_text`; yield the answer's pieces; remember both."""
        messages = [*self.history, {"role": "user", "content": user_text}]
        body = {"model": self.model_name(), "messages": messages, "stream": True, **self.options}
        answer = ""
        with self.http.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                self._checked(response)
            for piece in _sse_contents(response.iter_lines()):
                answer += piece
                yield piece
        self.history = [*messages, {"role": "assistant", "content": answer}]

    def repl(self, stdin: TextIO, stdout: TextIO) -> None:
        stdout.write(f"chatting with {self.model_name()} at {self.base_url} ('end' resets, 'exit' quits)\n")
        while True:
            stdout.write("\n>>> ")
            stdout.flush()
            line = stdin.readline()
            text = line.strip()
            if not line or text == "exit":
                return
            if text == "end":
                self.history = []
                stdout.write("(new conversation)\n")
                continue
            if text:
                self._answer(text, stdout)

    def _answer(self, text: str, stdout: TextIO) -> None:
        try:
            for piece in self.stream_answer(text):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write("\n(stopped)")
        except (httpx.HTTPError, RuntimeError) as error:
            stdout.write(f"error: {error}")
        stdout.write("\n")

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code}: {_error_message(response)}")
        return response


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _sse_contents(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        payload: dict[str, Any] = json.loads(data)
        if "error" in payload:
            raise RuntimeError(payload["error"].get("message", "server error"))
        for choice in payload.get("choices", []):
            content = choice.get("delta", {}).get("content")
            if content:
                yield content
