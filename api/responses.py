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


def link(path: str, method: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link from a response to the operation at `path` and `method`, its parameters
    taken from the response (`$response.body#/id`): how a client (or a stateful test) goes from
    what it created to what it can do with it."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method}", "description": description,
            "parameters": parameters}


def job_links(job_id: str) -> dict[str, Any]:
    """What can be done with a job whose id the response holds at `job_id`."""
    return {
        "GetJob": link("/v1/jobs/{job_id}", "get", "Read the job", job_id=job_id),
        "CancelJob": link("/v1/jobs/{job_id}/cancel", "post", "Cancel the job", job_id=job_id),
        "ListSteps": link("/v1/jobs/{job_id}/steps", "get", "The job's steps", job_id=job_id),
        "ListEvents": link("/v1/jobs/{job_id}/events", "get", "The job's events",
                           job_id=job_id),
        "ListDeliveries": link("/v1/jobs/{job_id}/webhook-deliveries", "get",
                               "The job's webhook deliveries", job_id=job_id),
        "AdminJob": link("/v1/admin/jobs/{job_id}", "get", "The job's spend (admin keys)",
                         job_id=job_id),
    }
