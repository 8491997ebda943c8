"""create_app(engine, ServeConfig) -> FastAPI: routes, offline Swagger page, middleware, web page mount."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

import lmserve
from lmserve.config import ServeConfig
from lmserve.engine.client import ChatTokenizer, EngineClient
from lmserve.serve import anthropic, embeddings, openai, responses, sampling
from lmserve.serve.errors import APIError, error_response, install_error_handlers
from lmserve.serve.guard import GuardMiddleware
from lmserve.serve.metrics import ServerMetrics
from lmserve.serve.protocol import AbortRequest, AbortResponse, EncodeRequest, EncodeResponse
from lmserve.serve.state import ServerState, get_state

STATIC_DIR = Path(__file__).parent / "static"
WEBUI_DIR = Path(__file__).parent / "webui"

misc = APIRouter()


def create_app(engine: EngineClient, config: ServeConfig) -> FastAPI:
    """The OpenAI-compatible app over one engine; serve it with uvicorn (see lmserve.cli.serve)."""
    docs = not config.disable_fastapi_docs
    app = FastAPI(
        title="lmserve",
        version=getattr(lmserve, "__version__", "0"),
        description="OpenAI-compatible API of lmserve.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    metrics = None if config.disable_metrics else ServerMetrics()
    app.state.lmserve = ServerState(engine=engine, config=config, metrics=metrics)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(misc)
    if metrics is not None:
        app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    if docs:
        app.add_api_route("/", _swagger_page, methods=["GET"], include_in_schema=False)
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if config.webui and WEBUI_DIR.is_dir():
        app.mount("/chat", StaticFiles(directory=WEBUI_DIR, html=True), name="webui")
    _add_middleware(app, config, metrics)
    return app


def _add_middleware(app: FastAPI, config: ServeConfig, metrics: ServerMetrics | None) -> None:
    # added last = outermost: CORS answers preflights and decorates 401/413 answers too
    app.add_middleware(
        GuardMiddleware, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes, metrics=metrics
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.allow_origins),
        allow_credentials=config.allow_credentials,
        allow_methods=list(config.allow_methods),
        allow_headers=list(config.allow_headers),
    )


async def _swagger_page() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="lmserve API",
        swagger_js_url="/static/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui.css",
        swagger_favicon_url="/static/favicon-32x32.png",
    )


async def _metrics(request: Request) -> Response:
    state = get_state(request)
    assert state.metrics is not None
    return state.metrics.render(state.engine.stats())


@misc.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine loop is alive and stepping, else 503."""
    if get_state(request).engine.is_alive():
        return JSONResponse({"status": "ok"})
    return error_response(503, "engine loop is not running")


@misc.post("/v1/encode", response_model=EncodeResponse)
async def encode(body: EncodeRequest, request: Request) -> EncodeResponse:
    """Tokenize text (LMDeploy's /v1/encode); do_preprocess wraps it as a chat user turn first."""
    tokenizer = get_state(request).engine.tokenizer
    texts = [body.input] if isinstance(body.input, str) else body.input
    ids = [_encode_one(tokenizer, text, body) for text in texts]
    if isinstance(body.input, str):
        return EncodeResponse(input_ids=ids[0], length=len(ids[0]))
    return EncodeResponse(input_ids=ids, length=[len(x) for x in ids])


def _encode_one(tokenizer: ChatTokenizer, text: str, body: EncodeRequest) -> list[int]:
    if body.do_preprocess:
        return sampling.encode_chat(tokenizer, [{"role": "user", "content": text}], {}, "input")
    return list(tokenizer.encode(text, add_special_tokens=body.add_bos))


@misc.post("/abort_request", response_model=AbortResponse)
async def abort_request(body: AbortRequest, request: Request) -> AbortResponse:
    """Abort one request by the id this server returned (chatcmpl-..., cmpl-...), or all of them."""
    state = get_state(request)
    in_flight = state.in_flight.engine_ids
    if body.abort_all:
        api_ids = list(in_flight)
    elif body.request_id is None:
        raise APIError(400, "give request_id or abort_all: true", "request_id")
    elif body.request_id not in in_flight:
        raise APIError(404, f"no running request with id {body.request_id!r}", "request_id")
    else:
        api_ids = [body.request_id]
    for api_id in api_ids:
        state.in_flight.abort(state.engine, api_id)
    return AbortResponse(aborted=api_ids)
