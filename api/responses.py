"""Error responses shared by the routers' OpenAPI documentation."""

from __future__ import annotations

from typing import Any

from api.jobs.schemas import ErrorResponse

Responses = dict[int | str, dict[str, Any]]

UNAUTHORIZED: Responses = {401: {"model": ErrorResponse,
                      "description": "Missing, unknown or revoked API key"}}
NOT_FOUND: Responses = {404: {"model": ErrorResponse, "description": "Not found for this tenant"}}
INVALID: Responses = {422: {"model": ErrorResponse,
                 "description": "Invalid input; the message names the field"}}
LIMITED: Responses = {429: {"model": ErrorResponse,
                 "description": "Rate limit or jobs-in-flight cap reached; see Retry-After"}}

# What every authenticated route may answer besides its success.
ERRORS: Responses = {**UNAUTHORIZED, **NOT_FOUND, **INVALID, **LIMITED}
