"""The agentq API: `uvicorn api.app:app`."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.admin.views import NeedsSignIn, sign_in_redirect
from api.admin.views import router as admin_pages
from api.limits import BodySizeLimit
from api.router import router


def create_app() -> FastAPI:
    app = FastAPI(
        title="agentq",
        version="0.1.0",
        description="Run long agentic AI jobs: submit, poll, cancel; every token accounted for.",
    )
    errors.install(app)
    app.add_middleware(BodySizeLimit)
    app.include_router(router)
    app.include_router(admin_pages)
    app.add_exception_handler(NeedsSignIn, sign_in_redirect)
    return app


app = create_app()
