"""/v1/embeddings of the embedded SmolLM2 (engine core in its own process) vs HF transformers, and its wire format."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import MODEL_NAME, RunningServer

# the server runs float32 (conftest); what differs from HF is only the order of the additions
ATOL = 1e-4
TEXTS = ["The capital of France is Paris.", "Embeddings let a search find text by meaning."]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf_path: Path) -> torch.nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@torch.no_grad()
def hf_last_token_embedding(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """--pooling last (the default): the final token's last_hidden_state (after the final norm), L2-normalized."""
    hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=0)


def token_ids(client: httpx.Client, texts: list[str]) -> list[list[int]]:
    ids = client.post("/v1/encode", json={"input": texts}).json()["input_ids"]
    assert isinstance(ids, list)
    return ids


def embed(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/embeddings", json={"model": MODEL_NAME, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_text_list_equals_hf_last_hidden_state(client: httpx.Client, hf_model: torch.nn.Module) -> None:
    body = embed(client, input=TEXTS)
    ids = token_ids(client, TEXTS)
    assert body["object"] == "list" and body["model"] == MODEL_NAME
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    for item, prompt in zip(body["data"], ids, strict=True):
        assert item["object"] == "embedding"
        torch.testing.assert_close(
            torch.tensor(item["embedding"]), hf_last_token_embedding(hf_model, prompt), atol=ATOL, rtol=0
        )


def test_token_ids_and_single_string_give_the_same_vectors(client: httpx.Client) -> None:
    ids = token_ids(client, TEXTS)
    by_text = [d["embedding"] for d in embed(client, input=TEXTS)["data"]]
    by_ids = [d["embedding"] for d in embed(client, input=ids)["data"]]
    one_text = embed(client, input=TEXTS[0])["data"]
    one_ids = embed(client, input=ids[0])["data"]
    assert len(one_text) == len(one_ids) == 1
    for a, b in [(by_text[0], by_ids[0]), (by_text[1], by_ids[1]), (by_text[0], one_text[0]["embedding"])]:
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        torch.tensor(one_ids[0]["embedding"]), torch.tensor(by_ids[0]), atol=ATOL, rtol=0
    )


def test_base64_is_the_float32_bytes_of_the_float_vector(client: httpx.Client) -> None:
    floats = embed(client, input=TEXTS[1])["data"][0]["embedding"]
    encoded = embed(client, input=TEXTS[1], encoding_format="base64")["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(floats) == 576  # SmolLM2-135M's hidden size
    torch.testing.assert_close(torch.tensor(decoded), torch.tensor(floats), atol=ATOL, rtol=0)


def test_openai_client_embeddings_create(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    floats = client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    # without encoding_format the client asks for base64 and decodes it itself
    decoded = client.embeddings.create(model=MODEL_NAME, input=TEXTS)
    assert [d.index for d in decoded.data] == [0, 1] and decoded.usage.prompt_tokens > 0
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert abs(sum(x * x for x in a.embedding) - 1.0) < 1e-4  # L2-normalized
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"input": []}, "input", "must not be empty"),
        ({"input": [""]}, "input", "input 0 is empty"),
        ({"input": [[1, 2], [10**9]]}, "input", "input 1 has token ids outside"),
        ({"input": "hi", "dimensions": 64}, "dimensions", "dimensions is not supported"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
        ({"input": [1] * 10_000}, "input", "maximum context length"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    client: httpx.Client, body: dict, param: str, fragment: str
) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_unknown_model_is_a_404(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": "other", "input": "hi"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
