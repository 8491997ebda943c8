"""OpenAI-style error bodies and the FastAPI exception handlers that produce them."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lmserve.serve")
# pydantic puts the Union member it tried ("str", "list[ContentPart]") in an error's location: no field
_UNION_MEMBER = re.compile(r"^(str|int|float|bool)$|\[")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a client should see: status code plus OpenAI's {message, type, param, code}."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def internal_error(request_id: str | None, failure: BaseException | str) -> APIError:
    """A 500 that tells the client a request id, never the failure's text (it may show internals).

    The log gets the id with the failure, and the traceback when it is an exception.
    """
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    if isinstance(failure, BaseException):
        logger.exception("internal error in request %s", request_id, exc_info=failure)
    else:
        logger.error("internal error in request %s: %s", request_id, failure)
    return APIError(500, f"internal error (request id {request_id}); the server log has the details")


def error_body(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's nested error object, as returned in bodies and in SSE `data:` lines."""
    error_type = _TYPES.get(
        status_code, "invalid_request_error" if status_code < 500 else "internal_server_error"
    )
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code)


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """Turn one pydantic error into (message naming the field, dotted field path)."""
    loc = [str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_member(part)]
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"malformed JSON body: {detail}".rstrip(": "), None
    param = ".".join(loc) or None
    message = str(error.get("msg", "invalid value"))
    if param is None:
        if error.get("type") == "model_attributes_type":
            return "request body must be a JSON object", None
        return f"request body: {message}", None
    return f"{param}: {message}", param


def _is_union_member(part: object) -> bool:
    return isinstance(part, str) and _UNION_MEMBER.search(part) is not None


def most_specific(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error deepest in the body: for a Union, the member that got furthest names the real problem."""
    return max(errors, key=lambda error: len(error.get("loc", ())))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    message, param = validation_message(most_specific(errors)) if errors else ("invalid request body", None)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return error_response(400, message, param)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status_code, exc.message, exc.param, exc.code)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(exc.status_code, str(exc.detail))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    error = internal_error(None, exc)
    return error_response(error.status_code, error.message)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as OpenAI's error JSON, never FastAPI's 422 shape."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
