"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}`.

Clients (the `openai` SDK included) read `error.message`, so each message is one sentence
naming what is wrong and how to fix it. Status codes are OpenAI's (and vLLM's), so the
`openai` client raises the exception users catch (400 -> `BadRequestError`):
    400 `invalid_request_error`: malformed JSON; a field missing, unknown, of the wrong type,
        empty or out of range; a prompt longer than the context; unsupported parameters
    401 missing or wrong API key              404 unknown model or route
    413 request body over the size limit      429 the waiting queue is full
    503 the engine failed or is shutting down
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic validation problem as one 400 sentence naming the field (FastAPI's
    default would be 422, which OpenAI's API never returns)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "missing":
        return APIError(400, f"'{param}' is required.", param)
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'; remove it (the OpenAI API reference lists the fields).", param)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}.", param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return error_response(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = validation_error(list(exc.errors()))
        return error_response(e.status, e.message, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}; "
                                       "the API is under /v1 (completions, chat/completions, models).")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}.")
        return error_response(exc.status_code, str(exc.detail))
