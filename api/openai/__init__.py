"""The OpenAI-compatible Batch and Files API (`/v1/files`, `/v1/batches`): point the official
`openai` SDK's `base_url` at agentq's `/v1` with an agentq API key."""

from __future__ import annotations

# Room for a multipart body's boundaries and part headers beyond the file itself.
MULTIPART_OVERHEAD = 64 * 1024


def upload_body_limit(method: str, path: str) -> int | None:
    """The largest request body a file upload may send (AGENTQ_BATCH_MAX_FILE_BYTES plus
    multipart framing); None for any other request."""
    if method != "POST" or path.rstrip("/") != "/v1/files":
        return None
    from core.settings import get_settings

    return get_settings().batch_max_file_bytes + MULTIPART_OVERHEAD
