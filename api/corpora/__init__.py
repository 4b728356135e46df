"""`/v1/corpora`: document collections that research jobs can search."""

from __future__ import annotations

import re

# Room for a multipart body's boundaries and part headers beyond the document itself.
MULTIPART_OVERHEAD = 64 * 1024

_UPLOAD_PATH = re.compile(r"/v1/corpora/[^/]+/documents/?")


def upload_body_limit(method: str, path: str) -> int | None:
    """The largest request body a document upload may send (the document limit,
    AGENTQ_CORPUS_MAX_DOCUMENT_BYTES, plus multipart framing); None for any other request. For
    the API's body-size limit, which otherwise holds every request to AGENTQ_MAX_BODY_BYTES."""
    if method != "POST" or not _UPLOAD_PATH.fullmatch(path):
        return None
    from agents.corpus import max_document_bytes

    return max_document_bytes() + MULTIPART_OVERHEAD
