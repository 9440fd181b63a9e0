"""An OpenAI-compatible HTTP API for stacks: the FastAPI app, errors in OpenAI's shape, Prometheus metrics.

The routes live in :mod:`.routes`, over one :class:`~slmstack.serving.state.ServerState` (stacks, batchers, metrics);
this module wires them: the lifespan that starts one batcher per backend, the API-key guard, and the error handlers.
A chat request's input is its last user message. Errors are ``{"error": {"message", "type", "param", "code"}}`` with a
4xx/5xx status, and never hold a file path, a traceback or a secret. (This module imports FastAPI: import it only
where the ``serve`` extra is installed.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slmstack.engine.text import GenerationCancelled
from slmstack.serving.requests import ApiError
from slmstack.serving.routes import router
from slmstack.serving.settings import ServeSettings
from slmstack.serving.state import ServerState
from slmstack.stack.backends import BackendError
from slmstack.stack.runtime import Stack

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "build_app"]


def build_app(stacks: dict[str, Stack], settings: ServeSettings) -> Any:
    """The FastAPI app serving ``stacks`` (model name -> loaded stack)."""
    state = ServerState(stacks, settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.start_batchers()
        yield
        await state.stop_batchers()

    app = FastAPI(title="slmstack", version="1", lifespan=lifespan)
    app.state.slm = state
    app.state.stop = state.stopping.set  # the server calls it when it is told to stop

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own 404/405 in OpenAI's shape, like every other error
        messages = {404: f"No such endpoint: {request.method} {request.url.path[:100]}",
                    405: f"Method {request.method} is not allowed on {request.url.path[:100]}"}  # fmt: skip
        err = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)[:200]),
                       code="not_found" if exc.status_code == 404 else None)  # fmt: skip
        return state.error_response(err, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return state.error_response(ApiError(400, "The request is not valid"), request.url.path)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if settings.api_key and path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {settings.api_key}":
                err = ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")  # fmt: skip
                return state.error_response(err, path)
        try:
            return await call_next(request)
        except ApiError as err:
            return state.error_response(err, path)
        except GenerationCancelled:
            err = ApiError(503, "The server is shutting down; retry on another server", "server_error",
                           code="shutting_down")  # fmt: skip
            return state.error_response(err, path)
        except BackendError:
            logger.exception("the generation backend failed on %s", path)
            err = ApiError(502, "The generation backend failed; see the server log", "server_error")
            return state.error_response(err, path)
        except Exception:  # noqa: BLE001 - never leak a traceback or a path
            logger.exception("internal error on %s", path)
            return state.error_response(ApiError(500, "Internal server error", "server_error"), path)

    app.include_router(router)
    return app
