"""The agentq API: `uvicorn api.app:app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api import errors
from api.admin.views import NeedsSignIn, sign_in_redirect
from api.admin.views import router as admin_pages
from api.guards import InputGuard
from api.limits import BodySizeLimit
from api.router import router
from core.db import pool_capacity
from core.settings import get_settings


def bound_threadpool() -> None:
    """Run at most as many sync endpoints and dependencies at once as the database pool has
    connections. Each holds at most one connection at a time, so a burst of requests waits
    for a thread, in arrival order and without a time limit, instead of filling the pool and
    timing out in it."""
    capacity = pool_capacity()
    if capacity is not None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = capacity


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    bound_threadpool()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="agentq",
        version="0.1.0",
        description="Run long agentic AI jobs: submit, poll, cancel; every token accounted for.",
        lifespan=_lifespan,
    )
    errors.install(app)
    app.add_middleware(InputGuard)
    app.add_middleware(BodySizeLimit)  # a body's size is checked before its content
    # Outermost: the scheme and client that trusted proxies report (https behind TLS).
    app.add_middleware(ProxyHeadersMiddleware,
                       trusted_hosts=get_settings().trusted_proxies)
    app.include_router(router)
    app.include_router(admin_pages)
    app.add_exception_handler(NeedsSignIn, sign_in_redirect)
    return app


app = create_app()
