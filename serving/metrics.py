"""Prometheus metrics of the API (`GET /metrics`, text format via prometheus-client) and the
ASGI middleware that counts requests, times them, tags each with a request id and, when asked,
writes one JSON access-log line per request.

Each app has its own registry, so several apps in one process (tests) do not share counters.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("serving.access")

REQUEST_ID_HEADER = "x-request-id"
_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ID_PREFIX = os.urandom(6).hex()  # unique per process; a counter makes ids unique within it
_ids = itertools.count(1)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServingMetrics:
    """Everything /metrics reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("towerrec_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("towerrec_request_seconds", "HTTP request latency by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_version = Gauge("towerrec_model_version",
                                   "model version served (0 = none loaded)", registry=r)
        self.index = Gauge("towerrec_index", "retrieval index in use (1 for the one in use)",
                           ["index"], registry=r)
        self.loads = Counter("towerrec_model_loads", "model version loads by outcome",
                             ["outcome"], registry=r)
        self.load_seconds = Histogram("towerrec_model_load_seconds",
                                      "time to load and warm up a model version",
                                      buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.reloads = Counter("towerrec_reloads", "reload scans by trigger (poll or admin)",
                               ["trigger"], registry=r)
        self.answers = Counter("towerrec_answers",
                               "recommendation answers by the model version that answered",
                               ["version"], registry=r)
        self.fallbacks = Counter("towerrec_popular_fallbacks",
                                 "answers with the most popular items (no known history item)",
                                 registry=r)
        self.unknown_items = Counter("towerrec_unknown_items",
                                     "item ids in requests that are not in the catalog",
                                     registry=r)
        self.live_writes = Counter("towerrec_live_writes",
                                   "rows written to the live database by kind (item, event)",
                                   ["kind"], registry=r)
        self.live_items = Gauge("towerrec_live_items",
                                "items put since the export and not withdrawn", registry=r)
        self.live_withdrawn = Gauge("towerrec_live_withdrawn", "items withdrawn", registry=r)
        self.live_database_ok = Gauge("towerrec_live_database_ok",
                                      "1 when the last read of the live database succeeded",
                                      registry=r)

    def serving_index(self, index: str, choices: tuple[str, ...]) -> None:
        for name in choices:
            self.index.labels(index=name).set(1.0 if name == index else 0.0)


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body copy): status and latency per route
    template, a request id echoed in `X-Request-ID` (the client's if it sent a sane one), and
    the JSON access-log line when enabled."""

    def __init__(self, app, metrics: ServingMetrics, access_log_enabled: bool = False):
        self.app, self.metrics, self.access_log = app, metrics, access_log_enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                text = value.decode("latin-1")
                request_id = text if _GOOD_REQUEST_ID.fullmatch(text) else None
        request_id = request_id or f"{_ID_PREFIX}-{next(_ids)}"
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(seconds)
            if self.access_log:
                access_log.info(json.dumps({
                    "request_id": request_id, "method": method, "path": scope.get("path"),
                    "route": template, "status": status,
                    "ms": round(seconds * 1000, 3),
                    "client": (scope.get("client") or ("", 0))[0]}))
