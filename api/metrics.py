"""Prometheus metrics at `/metrics`, read at scrape time from the database and Redis.

Counts come from the job and step tables and the ledger's running totals (`ledger_totals`, kept
in the transactions that write the ledger, so a scrape does not read the ledger itself), so
every API replica reports the same numbers and they agree with the admin page; pool in-flight
counts are what each worker process last published to Redis (every second, expiring when the
process dies); each endpoint's running and waiting requests and prefix-cache hit rate are read
from its own `/metrics`. Set
`AGENTQ_METRICS_TOKEN` to require `Authorization: Bearer <token>` on scrapes.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import Any, cast

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.db import read_session_factory
from core.errors import Unauthorized
from core.models import JobStatus, StepStatus, utcnow
from core.queue import queue_depths
from core.redis import get_redis
from core.repositories import jobs as jobs_repo
from core.repositories import ledger_totals, reports_counts
from core.settings import get_settings
from inference.pool import INFLIGHT_KEY_PREFIX

log = logging.getLogger(__name__)

JOB_STATUSES = tuple(str(s) for s in JobStatus)
STEP_STATUSES = tuple(str(s) for s in StepStatus)


class AgentqCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._database()
        yield from self._redis()
        yield from self._broker()
        yield from self._endpoints()

    def _endpoints(self) -> Iterator[Metric]:
        """Each pool endpoint's own counters (vLLM's /metrics): requests running and waiting,
        and its prefix-cache hit rate since it started."""
        from prometheus_client.parser import text_string_to_metric_families

        from core.catalogue import get_catalogue

        up = GaugeMetricFamily("agentq_endpoint_up", "The endpoint's /metrics answered",
                               labels=["endpoint"])
        running = GaugeMetricFamily("agentq_endpoint_requests_running",
                                    "Requests the endpoint is running", labels=["endpoint"])
        waiting = GaugeMetricFamily("agentq_endpoint_requests_waiting",
                                    "Requests waiting inside the endpoint", labels=["endpoint"])
        hit_rate = GaugeMetricFamily("agentq_endpoint_prefix_cache_hit_rate",
                                     "Prompt tokens served from the endpoint's prefix cache, "
                                     "over prompt tokens it was asked for", labels=["endpoint"])
        wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting",
                  "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                  "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"}
        for url in get_catalogue().endpoints:
            try:
                body = httpx.get(f"{url}/metrics", timeout=1.0).text
                sums: dict[str, float] = {}
                for family in text_string_to_metric_families(body):
                    for sample in family.samples:
                        if sample.name in wanted:
                            name = sample.name.removesuffix("_total")
                            sums[name] = sums.get(name, 0.0) + sample.value
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("metrics: endpoint %s: %s", url, exc)
                up.add_metric([url], 0)
                continue
            up.add_metric([url], 1)
            running.add_metric([url], sums.get("vllm:num_requests_running", 0.0))
            waiting.add_metric([url], sums.get("vllm:num_requests_waiting", 0.0))
            queries = sums.get("vllm:prefix_cache_queries", 0.0)
            if queries:
                hit_rate.add_metric([url], sums.get("vllm:prefix_cache_hits", 0.0) / queries)
        yield from (up, running, waiting, hit_rate)

    def _database(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("agentq_jobs", "Jobs by status", labels=["status"])
        steps = GaugeMetricFamily("agentq_steps", "Steps by status", labels=["status"])
        calls = CounterMetricFamily("agentq_model_calls", "Model calls in the ledger",
                                    labels=["model"])
        tokens = CounterMetricFamily("agentq_tokens", "Tokens in the ledger",
                                     labels=["model", "type"])
        cost = CounterMetricFamily("agentq_cost_usd", "Dollars charged in the ledger",
                                   labels=["model"])
        energy = CounterMetricFamily("agentq_energy_wh", "Watt-hours attributed to model calls",
                                     labels=["model"])
        misses = CounterMetricFamily("agentq_deadline_misses", "Jobs that ended after their "
                                     "deadline, or are still running past it")
        promoted = CounterMetricFamily("agentq_jobs_promoted", "Flex jobs promoted to "
                                       "standard to meet their deadlines")
        up = GaugeMetricFamily("agentq_database_up", "The database answered this scrape")
        session = read_session_factory()()
        try:
            by_status = dict.fromkeys(JOB_STATUSES, 0)
            by_status.update(reports_counts.job_counts(session))
            for status, n in by_status.items():
                jobs.add_metric([status], n)
            step_status = dict.fromkeys(STEP_STATUSES, 0)
            step_status.update(reports_counts.step_counts(session))
            for status, n in step_status.items():
                steps.add_metric([status], n)
            # Running totals: a scrape reads a few rows per model, not the ledger.
            for model, s in ledger_totals.by_model(session).items():
                calls.add_metric([model], s.calls)
                tokens.add_metric([model, "prompt"], s.prompt_tokens)
                tokens.add_metric([model, "completion"], s.completion_tokens)
                tokens.add_metric([model, "cached_prompt"], s.cached_tokens)
                cost.add_metric([model], float(s.cost_usd))
                energy.add_metric([model], s.energy_wh)
            missed, promotions = jobs_repo.deadline_counts(session, utcnow())
            misses.add_metric([], missed)
            promoted.add_metric([], promotions)
            up.add_metric([], 1)
        except Exception as exc:  # noqa: BLE001 - a scrape reports the outage, not a 500
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        finally:
            session.close()
        yield from (jobs, steps, calls, tokens, cost, energy, misses, promoted, up)

    def _redis(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("agentq_pool_in_flight",
                                      "Model calls in flight, by endpoint, over all workers",
                                      labels=["endpoint"])
        processes = GaugeMetricFamily("agentq_pool_processes",
                                      "Worker processes reporting pool counts")
        up = GaugeMetricFamily("agentq_redis_up", "Redis answered this scrape")
        try:
            r = get_redis()
            totals: dict[str, int] = {}
            keys = list(r.scan_iter(match=INFLIGHT_KEY_PREFIX + "*", count=500))
            for key in keys:
                for endpoint, n in cast(dict[Any, Any], r.hgetall(key)).items():
                    name = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
                    totals[name] = totals.get(name, 0) + int(n)
            for url in get_settings().pool_endpoints:
                totals.setdefault(url.rstrip("/"), 0)
            for endpoint, n in sorted(totals.items()):
                in_flight.add_metric([endpoint], n)
            processes.add_metric([], len(keys))
            up.add_metric([], 1)
        except Exception as exc:  # noqa: BLE001 - a scrape reports the outage, not a 500
            log.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        yield from (in_flight, processes, up)

    def _broker(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("agentq_queue_depth", "Step and delivery messages waiting",
                                  labels=["queue"])
        up = GaugeMetricFamily("agentq_broker_up", "The Celery broker answered this scrape")
        try:
            depths = queue_depths()
        except Exception as exc:  # noqa: BLE001 - a scrape reports the outage, not a 500
            log.warning("metrics: the broker is unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        up.add_metric([], 1)
        yield from (depth, up)


registry = CollectorRegistry(auto_describe=False)
registry.register(AgentqCollector())

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text exposition format"}})
def metrics(request: Request) -> Response:
    """Jobs and steps by status, model calls, tokens, cost and energy by model, queue depth and
    pool in-flight counts, in Prometheus' text format."""
    token = get_settings().metrics_token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("this /metrics needs 'Authorization: Bearer <metrics token>'")
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
