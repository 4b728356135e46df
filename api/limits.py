"""Request limits: per-tenant rate limits (the `limits` library, moving window in Redis) and a
cap on request body size that also holds for chunked bodies sent without a length."""

from __future__ import annotations

import logging
import math
import threading
import time

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.corpora import upload_body_limit
from api.openai import upload_body_limit as file_upload_limit
from api.openai.errors import is_openai_path, openai_error
from core.errors import TooManyRequests
from core.settings import get_settings

log = logging.getLogger(__name__)


class _Limiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limiter: MovingWindowRateLimiter | None = None
        self._item: RateLimitItem | None = None

    def _get(self) -> tuple[MovingWindowRateLimiter, RateLimitItem]:
        with self._lock:
            if self._limiter is None or self._item is None:
                settings = get_settings()
                self._limiter = MovingWindowRateLimiter(storage_from_string(settings.redis_url))
                self._item = parse(settings.rate_limit)
            return self._limiter, self._item

    def check(self, tenant_id: str) -> None:
        try:
            limiter, item = self._get()
            if limiter.hit(item, "tenant", tenant_id):
                return
            stats = limiter.get_window_stats(item, "tenant", tenant_id)
        except Exception as exc:  # Redis away: fail open rather than refuse every request
            log.warning("rate limiter unavailable: %s", exc)
            return
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise TooManyRequests(f"rate limit of {item} exceeded for this tenant; retry in "
                              f"{retry_after} s", retry_after=retry_after)


rate_limiter = _Limiter()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413: by `Content-Length` at once, and by counting
    the bytes of bodies sent without one (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes or get_settings().max_body_bytes
        # Document uploads have a limit of their own (AGENTQ_CORPUS_MAX_DOCUMENT_BYTES).
        method, path = scope.get("method", ""), scope.get("path", "")
        upload_limit = upload_body_limit(method, path) or file_upload_limit(method, path)
        if upload_limit is not None:
            limit = max(limit, upload_limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _reject(send, limit, path)
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send, limit, path)


async def _reject(send: Send, limit: int, path: str) -> None:
    import json

    message = f"request body larger than {limit} bytes"
    error = openai_error(413, message, "file_too_large") if is_openai_path(path) else {
        "error": {"code": "payload_too_large", "message": message}}
    body = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
