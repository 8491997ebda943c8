"""`lmserve bench serving` against a server with a fake engine: exact prompt length, counts, JSON report."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import start_server
from fake_engine import FakeEngine

from lmserve.cli.main import main
from lmserve.config import ServeConfig


def test_bench_serving_reports_json(tmp_path: Path) -> None:
    server = start_server(FakeEngine(session_len=4096), ServeConfig(model_name="m"))
    try:
        out = tmp_path / "report.json"
        argv = ["bench", "serving", "--base-url", server.base_url, "--num-prompts", "8", "--concurrency", "4"]
        assert main([*argv, "--input-len", "32", "--output-len", "8", "--json", str(out)]) == 0
    finally:
        server.stop()
    report = json.loads(out.read_text())
    assert report["num_errors"] == 0 and report["num_requests"] == 8
    assert report["prompt_tokens"] == 32  # the fake's byte tokenizer counts " the" as 4 tokens: calibrated
    assert report["output_tok_per_s"] > 0 and set(report["ttft_s"]) == {"mean", "p50", "p99"}
