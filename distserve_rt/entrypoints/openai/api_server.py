"""`build_app(engine)`: the OpenAI-compatible FastAPI app over any `EngineClient`.

Routes (vLLM's paths and shapes): ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``, ``GET /version``,
``GET /health`` and ``GET|POST /ping`` (200, or 503 when the engine is dead),
``GET /metrics`` (Prometheus text), ``GET /docs`` (FastAPI's Swagger page: it loads its
JavaScript and CSS from a CDN, so it renders only where the browser reaches the internet;
``GET /openapi.json``, the schema it shows, is served from here and works offline).
With an API key, every ``/v1/*`` route needs ``Authorization: Bearer <key>`` (401
otherwise); the others stay open for probes, scrapers and tools, as in vLLM.

The app does not own the engine: whoever built the engine shuts it down
(`distserve_rt.entrypoints.serve` does, when uvicorn exits).
"""

from __future__ import annotations

import secrets
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

import distserve_rt
from distserve_rt.engine.protocol import EngineClient, EngineDeadError
from distserve_rt.entrypoints.openai.errors import OpenAIError, install_error_handlers
from distserve_rt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from distserve_rt.entrypoints.openai.responses import ModelCard, ModelList, now_s
from distserve_rt.entrypoints.openai.serving_chat import OpenAIServingChat
from distserve_rt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from distserve_rt.entrypoints.openai.serving_engine import ConcurrencyLimiter, ServingContext
from distserve_rt.entrypoints.openai.serving_tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIServingTokenization,
    TokenizeRequest,
    TokenizeResponse,
)
from distserve_rt.logger import init_logger
from distserve_rt.metrics.prometheus import PrometheusMetrics

logger = init_logger(__name__)


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <api_key>`` on /v1/* before the body is read, so
    an unauthenticated client learns nothing about the request format."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                error = OpenAIError(
                    HTTPStatus.UNAUTHORIZED,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_concurrent: int | None = None,
) -> FastAPI:
    """The server app. `served_model_name` defaults to ``engine.model_name``;
    `max_concurrent` (None: no limit) caps generation requests in flight (429 past it)."""
    if not isinstance(engine, EngineClient):
        raise TypeError(f"engine must implement EngineClient, got {type(engine).__name__}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must be None (no auth) or a non-empty string, got ''")
    model_name = served_model_name or engine.model_name
    ctx = ServingContext(
        engine=engine,
        model_name=model_name,
        metrics=PrometheusMetrics(engine.stats, model_name),
        limiter=ConcurrencyLimiter(max_concurrent),
    )
    # /docs: Swagger UI, whose page pulls its assets from a CDN (offline it stays blank;
    # /openapi.json is local). ReDoc is off: one docs page is enough.
    app = FastAPI(
        title="distserve_rt OpenAI-compatible server",
        version=distserve_rt.__version__,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.serving = ctx
    install_error_handlers(app)
    _add_fallback_handler(app)
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    _add_generation_routes(app, ctx)
    _add_tokenization_routes(app, ctx)
    _add_info_routes(app, ctx)
    return app


def _add_fallback_handler(app: FastAPI) -> None:
    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request")
        error = OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
        return error.response()

    app.add_exception_handler(Exception, on_error)


def _add_generation_routes(app: FastAPI, ctx: ServingContext) -> None:
    completions = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(
        request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        return await chat.create(request, raw_request)


def _add_tokenization_routes(app: FastAPI, ctx: ServingContext) -> None:
    tokenization = OpenAIServingTokenization(ctx)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        return tokenization.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return tokenization.detokenize(request)


def _add_info_routes(app: FastAPI, ctx: ServingContext) -> None:
    created = now_s()

    @app.get("/v1/models")
    async def show_models() -> ModelList:
        card = ModelCard(
            id=ctx.model_name,
            created=created,
            root=ctx.engine.model_name,
            max_model_len=ctx.engine.max_model_len,
        )
        return ModelList(data=[card])

    @app.get("/version")
    async def version() -> dict:
        return {"version": distserve_rt.__version__}

    # /ping is what SageMaker-style load balancers probe (GET or POST); same answer.
    @app.get("/health")
    @app.get("/ping")
    @app.post("/ping")
    async def health() -> Response:
        try:
            await ctx.engine.check_health()
        except EngineDeadError as exc:
            return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, f"engine is dead: {exc}").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
