"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes goes through `OpenAIError`, so clients (the openai package,
`vllm bench serve`) get the same body for a bad field (400), a missing key (401), an unknown
model (404), a full server (429), an overloaded or dead engine (503) and a failed
generation (500).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from distserve_rt.logger import init_logger

logger = init_logger(__name__)

_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.TOO_MANY_REQUESTS: "RateLimitError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """A refusal with its HTTP status and, for a bad field, the field's name."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.param = param

    def body(self) -> dict:
        error_type = _ERROR_TYPES.get(self.status, self.status.phrase.replace(" ", ""))
        return {
            "error": {
                "message": self.message,
                "type": error_type,
                "param": self.param,
                "code": int(self.status),
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=int(self.status))

    def sse_event(self) -> str:
        """The error as one server-sent event (a stream that already answered 200)."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param)


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming the field (``messages.0.role``)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if _is_field(part)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message} (got {first.get('input')!r})"
    return bad_request(message, param)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_field(part: str | int) -> bool:
    """Whether a pydantic error location part names a field or an index, not the body or
    a union member pydantic tried ("str", "list[int]", "ChatMessage", "function-after")."""
    if isinstance(part, int):
        return True
    return not (
        part == "body" or part in _TYPE_TAGS or any(c in part for c in "[-") or part[:1].isupper()
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
