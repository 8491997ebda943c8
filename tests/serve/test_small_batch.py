"""With --max-batch-size 2, 16 concurrent requests queue in the engine and all finish."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import MODEL_NAME, RunningServer, load_engine, start_server

from lmserve.config import ServeConfig


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    engine = load_engine(max_batch_size=2)
    running = start_server(engine, ServeConfig(model_name=MODEL_NAME, max_concurrent_requests=8))
    yield running
    running.stop()
    engine.shutdown()


def test_16_concurrent_requests_all_finish(small_server: RunningServer) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> dict[str, Any]:
        body = {"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 4, "stream": i % 2 == 0}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return {"i": i, "text": response.text}

    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=small_server.base_url, timeout=600) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 16
    assert all(r["text"].rstrip().endswith("[DONE]") for r in results if r["i"] % 2 == 0)
    stats = small_server.engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
