"""The step path's prebuilt statements sent straight to the driver on Postgres (`core.direct`)
write and return what SQLAlchemy's own execution of them does."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.helpers import auth


def test_the_direct_path_runs_the_step_paths_statements_as_sqlalchemy_does(
        client: TestClient, tenant_key: str, quiet_workers: None) -> None:
    from core.db import core_execute, is_postgres, transaction
    from core.direct import Direct
    from core.models import StepStatus
    from core.repositories import steps

    job_id = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "completion", "input": {"prompt": "Direct", "max_tokens": 4}}).json()["id"]
    with transaction() as s:
        assert is_postgres(s)
        conn = s.connection()
        # The hot statements are planned (sent to the driver), not left to SQLAlchemy.
        for prebuilt in (steps._CLAIM, steps._FINISH):
            assert Direct.plan(prebuilt(s), conn) is not None
        step_id = s.execute(text("SELECT id FROM steps WHERE job_id = :j"),
                            {"j": job_id}).scalar_one()
        params: dict[str, Any] = {"p_id": step_id, "p_now": None, "p_lease": 60.0}
        # The claim, both ways, in a savepoint each: the same row.
        nested = s.begin_nested()
        by_sqlalchemy = tuple(core_execute(s, steps._CLAIM(s), params).one())
        nested.rollback()
        by_driver = steps._CLAIM.execute(s, params).one()
        assert by_driver == by_sqlalchemy
        assert by_driver[0] == job_id
        # A failed run's output, None, is stored as SQLAlchemy stores it: JSON null.
        done = steps.finish(s, step_id, int(by_driver[3]), StepStatus.FAILED, error="boom")
        assert done is not None
        stored = s.execute(text("SELECT output IS NULL, jsonb_typeof(output), error "
                                "FROM steps WHERE id = :i"), {"i": step_id}).one()
        assert tuple(stored) == (False, "null", "boom")
        s.rollback()
