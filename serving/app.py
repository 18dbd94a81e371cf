"""The recommendation API: FastAPI endpoints over the current exported model version.

`create_app(model_dir, ...)` builds an app whose startup loads the VERSION the policy picks
under model_dir and polls for others. The module attribute `app` is built from the environment
(MODEL_DIR, INDEX, POLL_SECONDS, MODEL_VERSION, KEEP_VERSIONS, AB_SPLIT, ADMIN_TOKEN,
ACCESS_LOG, MAX_BODY_BYTES, DATABASE_URL) on first access, so `uvicorn main:app` works and
importing this module for tests loads nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.contract import HISTORY_MAX
from recdata.livedb import Database, DatabaseError, default_url, describe
from serving.live import LIVE_PREFETCH, ItemFilter, LiveState
from serving.metrics import RequestMetricsMiddleware, ServingMetrics
from serving.model_store import INDEXES, ModelError, ModelStore, ServingModel, VersionPolicy
from serving.schemas import (
    ID_MAX_CHARS,
    K_MAX,
    BulkItemsRequest,
    ErrorResponse,
    EventIn,
    EventsRequest,
    EventsWritten,
    HealthResponse,
    HistoryItem,
    HistoryResponse,
    ItemIn,
    ItemSearchResponse,
    ItemsWritten,
    LiveItemOut,
    LiveResponse,
    MetadataResponse,
    RankRequest,
    RankResponse,
    ReadyResponse,
    RecommendationsResponse,
    RecommendRequest,
    ReloadResponse,
    ScoredItem,
    SimilarResponse,
    UsersResponse,
    VersionsResponse,
)
from serving.split import TrafficSplit

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "saved_model/sample"
STATIC = Path(__file__).resolve().parent / "static"  # the browser page
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 1,000-item history of 256-character ids is ~260 KB
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
UNAVAILABLE = {503: {"model": ErrorResponse, "description": "no model loaded, or it failed"}}
VERSION_404 = {404: {"model": ErrorResponse,
                     "description": "?version=N names a version that is not loaded"}}
ADMIN = {401: {"model": ErrorResponse, "description": "no or a wrong admin token"},
         403: {"model": ErrorResponse, "description": "admin routes are disabled"}}
WRITE_FAILED = {503: {"model": ErrorResponse,
                      "description": "the database cannot be reached (nothing was written), "
                                     "or no model is loaded"}}

router = APIRouter()


async def get_store(request: Request) -> ModelStore:
    return request.app.state.store


async def current_model(request: Request) -> ServingModel:
    """The default version (async: no thread hop just to read it)."""
    model = request.app.state.store.current
    if model is None:
        raise HTTPException(503, "no model version is loaded yet; see GET /ready")
    return model


async def chosen_model(request: Request, version: Annotated[int | None, Query(
        ge=1, description="answer from this loaded version (GET /versions lists them)")] = None,
                       ) -> ServingModel:
    """The model a request uses from start to end: `?version=N`, else the version the A/B
    split assigns to the path's user id, else the default version."""
    store: ModelStore = request.app.state.store
    if version is not None:
        model = store.get(version)
        if model is None:
            raise HTTPException(404, f"model version {version} is not loaded (loaded: "
                                     f"{store.loaded_versions}); see GET /versions")
        return model
    split: TrafficSplit | None = request.app.state.split
    user_id = request.path_params.get("user_id")
    if split is not None and user_id is not None:
        model = store.get(split.assign(user_id))
        if model is not None:
            return model
    return await current_model(request)


Model = Annotated[ServingModel, Depends(chosen_model)]


async def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


Metrics = Annotated[ServingMetrics, Depends(get_metrics)]


async def require_admin(request: Request) -> None:
    """`Authorization: Bearer $ADMIN_TOKEN`; with no token configured, admin routes answer
    only on a server bound to loopback."""
    token = request.app.state.admin_token
    if not token:
        host = (request.scope.get("server") or ("",))[0]
        if host in LOOPBACK:
            return
        raise HTTPException(403, "admin routes are disabled: set ADMIN_TOKEN on the server "
                                 "(or bind it to 127.0.0.1)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "admin routes need the header 'Authorization: Bearer "
                                 "<ADMIN_TOKEN>'", headers={"WWW-Authenticate": "Bearer"})


def _title(model: ServingModel, item: str) -> str:
    snap = model.view.snapshot if model.view is not None else None
    if snap is not None and item in snap.row:
        live = model.live_state.item(item)
        if live is not None:
            return live.text
    return model.titles.get(item, "")


def _scored(model: ServingModel, pairs: list[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(item_id=item, title=_title(model, item), score=score)
            for item, score in pairs]


Str = Annotated[str, Query(max_length=ID_MAX_CHARS)]


async def query_filter(include_categories: Annotated[list[Str], Query()] = [],  # noqa: B006
                       exclude_categories: Annotated[list[Str], Query()] = [],  # noqa: B006
                       include_brands: Annotated[list[Str], Query()] = [],  # noqa: B006
                       exclude_brands: Annotated[list[Str], Query()] = [],  # noqa: B006
                       include_items: Annotated[list[Str], Query()] = [],  # noqa: B006
                       exclude_items: Annotated[list[Str], Query()] = [],  # noqa: B006
                       ) -> ItemFilter:
    """Filters as repeated query parameters (?include_categories=a&include_categories=b)."""
    return ItemFilter.of(include_categories=include_categories,
                         exclude_categories=exclude_categories, include_brands=include_brands,
                         exclude_brands=exclude_brands, include_items=include_items,
                         exclude_items=exclude_items)


QueryFilter = Annotated[ItemFilter, Depends(query_filter)]
NO_FILTER = ItemFilter()


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _popular(model: ServingModel, k: int, flt: ItemFilter, seen: set[str]
             ) -> list[tuple[str, float]]:
    """The most popular items that may be returned."""
    snap = model.view.snapshot if model.view is not None else None
    if not flt and not seen and (snap is None or not snap.active):
        return model.popular[:k]
    allowed = model.live.allowed_rows(snap, flt, seen)
    rows = np.flatnonzero(allowed)
    counts = model.row_counts[rows]
    top = rows[np.lexsort((model.embedding_ids[rows], -counts))[:k]]
    return [(str(model.embedding_ids[i]), float(model.row_counts[i])) for i in top]


async def recommend(model: ServingModel, metrics: ServingMetrics, user_id: str | None,
                    history: list[str], event_types: list[str] | None, k: int,
                    exclude_seen: bool, rerank: bool, stored: bool = False,
                    flt: ItemFilter = NO_FILTER) -> Response:
    """Retrieve (and optionally re-rank) for a raw history; the most popular items when no item
    of it is known. `stored`: a history from the version's own user table, all catalog ids.
    Live items (put since the export) are merged in by score, withdrawn items and those the
    filter refuses left out (serving/live.py).

    Answers pre-serialised JSON: the response model is built once here, so FastAPI does not
    validate it a second time on the way out (the endpoint's response_model documents it)."""
    snap = model.view.snapshot if model.view is not None else None
    if stored:
        known, kinds, unknown = history, event_types, []
    else:
        known, kinds, unknown = model.known_history(history, event_types)
        if unknown and snap is not None and snap.n:  # live items are known, if not to the graph
            unknown = [item for item in unknown if item not in snap.row]
        metrics.unknown_items.inc(len(unknown))
    metrics.answers.labels(version=str(model.version)).inc()
    seen = set(history) if exclude_seen else set()
    live_at = ([i for i, item in enumerate(history) if item in snap.row]
               if snap is not None and snap.n and len(known) < len(history) else [])
    call = None
    if live_at:  # items added while serving: the user tower reads their live vectors
        vectors = np.zeros((len(history), snap.vectors.shape[1]), np.float32)
        vectors[live_at] = snap.vectors[[snap.row[history[i]] for i in live_at]]
        call = model.live_retrieve_call(history, event_types, exclude_seen, vectors)
    if not known and call is None:
        metrics.fallbacks.inc()
        return _json(RecommendationsResponse(
            user_id=user_id, model_version=model.version, fallback=True,
            recommendations=_scored(model, _popular(model, k, flt, seen)),
            unknown_items=unknown))
    if call is not None:
        out = await asyncio.wrap_future(call)
        found, query = model.found_items(out), model.query_of(out)
        events_used = event_types is not None
    else:
        found, events_used, query, out = await model.retrieve_async(known, kinds,
                                                                    exclude_seen)
    if flt or (snap is not None and snap.active) or len(known) < len(history):
        args = (found, query, min(k, model.k), flt, seen, out.get(LIVE_PREFETCH))
        # A filter may search the index again or score many items: off the event loop.
        found = (await asyncio.to_thread(model.live.finish, *args) if flt
                 else model.live.finish(*args))
    if rerank and found:
        live = snap.row if snap is not None else {}
        ranked, _ = await model.rank_async(known, kinds, [item for item, _ in found
                                                         if item not in live])
        # Live items (new, or changed since the export) have no ranking-head score: kept in
        # retrieval order after the ranked ones.
        found = ranked + [pair for pair in found if pair[0] in live]
        events_used = kinds is not None
    return _json(RecommendationsResponse(
        user_id=user_id, model_version=model.version, recommendations=_scored(model, found[:k]),
        unknown_items=unknown, reranked=rerank, event_types_used=events_used))


def _user_history(model: ServingModel, user_id: str):
    """The export's history of a user plus the events since (newest last), as (items, event
    types, stored: nothing added), or None for a user neither knows."""
    stored = model.histories.get(user_id)
    events = model.live_state.user_events(user_id, int(model.metadata.get("events_through")
                                                       or 0))
    if not events:
        return None if stored is None else (*stored, user_id not in model.unclean_histories)
    history, kinds = stored if stored is not None else ([], [])
    return ([*history, *(e.item_id for e in events)],
            [*kinds, *(e.event_type for e in events)], False)


@router.get("/recommendations/{user_id}", response_model=RecommendationsResponse,
            responses={404: {"model": ErrorResponse,
                             "description": "unknown user, or ?version=N not loaded"},
                       **UNAVAILABLE})
async def recommend_user(model: Model, metrics: Metrics, flt: QueryFilter,
                   user_id: Annotated[str, PathParam(max_length=256)],
                   k: Annotated[int, Query(ge=1, le=K_MAX)] = 10, exclude_seen: bool = True,
                   rerank: bool = False,
                   fallback: Annotated[Literal["popular"] | None, Query(
                       description="answer an unknown user with the most popular items")] = None,
                   ) -> Response:
    """Recommendations for a known user from their stored history plus the events POSTed since
    the export (newest last)."""
    found = _user_history(model, user_id)
    if found is None:
        if fallback != "popular":
            raise HTTPException(404, f"unknown user_id {user_id!r} (model version "
                                     f"{model.version}); pass fallback=popular to get the "
                                     "most popular items instead")
        return await recommend(model, metrics, user_id, [], None, k, exclude_seen, rerank,
                               flt=flt)
    history, event_types, stored = found
    return await recommend(model, metrics, user_id, history, event_types, k, exclude_seen,
                           rerank, stored=stored, flt=flt)


@router.post("/recommendations", response_model=RecommendationsResponse,
             responses={**UNAVAILABLE, **VERSION_404})
async def recommend_session(model: Model, metrics: Metrics,
                      body: RecommendRequest) -> RecommendationsResponse:
    """Recommendations for an anonymous or live session given as raw item ids, newest last."""
    flt = ItemFilter.of(**body.filter.model_dump()) if body.filter else NO_FILTER
    return await recommend(model, metrics, None, body.history, body.event_types, body.k,
                           body.exclude_seen, body.rerank, flt=flt)


@router.get("/items/{item_id}/similar", response_model=SimilarResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown or withdrawn "
                                                                   "item, or ?version=N not "
                                                                   "loaded"},
                       **UNAVAILABLE})
def similar_items(model: Model, flt: QueryFilter,
                  item_id: Annotated[str, PathParam(max_length=256)],
                  k: Annotated[int, Query(ge=1, le=K_MAX)] = 10) -> SimilarResponse:
    """Nearest items by cosine of the item vectors (exported and live), the item itself and
    withdrawn items excluded."""
    found = model.similar(item_id, k, flt)
    if found is None:
        raise HTTPException(404, f"unknown or withdrawn item_id {item_id!r} (model version "
                                 f"{model.version})")
    return SimilarResponse(item_id=item_id, model_version=model.version,
                           similar=_scored(model, found))


@router.post("/rank", response_model=RankResponse, responses={**UNAVAILABLE, **VERSION_404})
async def rank(model: Model, metrics: Metrics, body: RankRequest) -> RankResponse:
    """The ranking head's scores for candidates given a history; best first."""
    history, kinds, unknown = model.known_history(body.history, body.event_types)
    metrics.unknown_items.inc(len(unknown))
    ranked, unknown_candidates = await model.rank_async(history, kinds, body.candidates)
    return RankResponse(model_version=model.version, ranked=_scored(model, ranked),
                        unknown_candidates=unknown_candidates, unknown_items=unknown)


@router.get("/users/{user_id}/history", response_model=HistoryResponse,
            responses={404: {"model": ErrorResponse,
                             "description": "unknown user, or ?version=N not loaded"},
                       **UNAVAILABLE})
async def user_history(model: Model, user_id: Annotated[str, PathParam(max_length=256)],
                       limit: Annotated[int, Query(ge=1, le=HISTORY_MAX)] = 50,
                       ) -> HistoryResponse:
    """A known user's events (the input of GET /recommendations/{user_id}: the export's and
    those POSTed since), newest first; the same version answers as for that user's
    recommendations."""
    found = _user_history(model, user_id)
    if found is None:
        raise HTTPException(404, f"unknown user_id {user_id!r} (model version "
                                 f"{model.version})")
    history, kinds, _ = found
    newest = [HistoryItem(item_id=item, title=_title(model, item), event_type=kind)
              for item, kind in zip(reversed(history), reversed(kinds), strict=True)]
    return HistoryResponse(user_id=user_id, model_version=model.version, history=newest[:limit])


@router.get("/users", response_model=UsersResponse, responses={**UNAVAILABLE, **VERSION_404})
async def users(model: Model, prefix: Annotated[str, Query(max_length=256)] = "",
                limit: Annotated[int, Query(ge=1, le=K_MAX)] = 20) -> UsersResponse:
    """User ids starting with `prefix`, stored or known from events since (for pickers)."""
    found = set(model.users(prefix, limit))
    found.update(u for u in list(model.live_state.events) if u.startswith(prefix))
    return UsersResponse(model_version=model.version, user_ids=sorted(found)[:limit])


@router.get("/items", response_model=ItemSearchResponse, responses={**UNAVAILABLE, **VERSION_404})
def search_items(model: Model, q: Annotated[str, Query(min_length=1, max_length=256)],
                 limit: Annotated[int, Query(ge=1, le=K_MAX)] = 20) -> ItemSearchResponse:
    """Items whose id or title contains `q` (case-insensitive): live items put since the
    export first (newest first, score 0), then catalog items, most popular first; withdrawn
    items never."""
    snap = model.view.snapshot if model.view is not None else None
    needle, live = q.lower(), []
    if snap is not None and snap.n:
        for item_id in reversed(list(snap.row)):
            item = model.live_state.item(item_id)
            if item is not None and needle in f"{item_id} {item.text}".lower():
                live.append((item_id, 0.0))
                if len(live) == limit:
                    break
    found = model.search(q, limit + (snap.blocked_count if snap is not None else 0))
    if snap is not None and snap.active:
        found = [(i, n) for i, n in found if i not in snap.row and not (
            i in model.embedding_row and snap.blocked[model.embedding_row[i]])]
    return ItemSearchResponse(model_version=model.version,
                              items=_scored(model, (live + found)[:limit]))


@router.get("/versions", response_model=VersionsResponse, responses=UNAVAILABLE)
async def versions(request: Request, model: Annotated[ServingModel, Depends(current_model)]
                   ) -> VersionsResponse:
    """The loaded versions, the default one and the A/B split, if any."""
    store: ModelStore = request.app.state.store
    split: TrafficSplit | None = request.app.state.split
    return VersionsResponse(default_version=model.version,
                            loaded_versions=store.loaded_versions,
                            version_policy=str(store.policy),
                            ab_split={str(v): share for v, share in split.shares}
                            if split else None)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The browser page: a user's history and recommendations, sessions, similar items, two
    versions side by side (plain HTML + JS over the JSON endpoints)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse,
            responses={503: {"model": ReadyResponse, "description": "no model loaded"}})
async def ready(response: Response,
                store: Annotated[ModelStore, Depends(get_store)]) -> ReadyResponse:
    """Readiness: a model version is loaded and warmed up."""
    model = store.current
    if model is None:
        response.status_code = 503
        detail = ("a model version is loading" if store.loading else
                  f"no loadable model version in MODEL_DIR (policy {store.policy})")
        return ReadyResponse(ready=False, index=store.index, detail=detail)
    return ReadyResponse(ready=True, model_version=model.version, index=model.index)


@router.get("/metadata", response_model=MetadataResponse, responses={**UNAVAILABLE, **VERSION_404})
async def metadata(model: Model, store: Annotated[ModelStore, Depends(get_store)]
                   ) -> MetadataResponse:
    """The served version: data set, test metrics, index parameters, library versions."""
    meta = model.metadata
    fields = ("data_source", "data_manifest", "test_metrics", "max_seq_len", "embedding_dim",
              "default_event_type", "scann", "created", "versions")
    return MetadataResponse(model_version=model.version, version_policy=str(store.policy),
                            index=model.index, k=model.k,
                            event_types=meta.get("event_types") or [],
                            **{name: meta.get(name) for name in fields})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request, metrics: Metrics) -> Response:
    """Prometheus text format: requests and latency per route and status, model version,
    loads, reloads, popular fallbacks, unknown item ids, the index in use, the live service's
    writes, items, withdrawals and database health."""
    live: LiveState = request.app.state.live
    metrics.live_items.set(len(live.items))
    metrics.live_withdrawn.set(len(live.withdrawn))
    metrics.live_database_ok.set(0 if live.db is None or live.last_error else 1)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", response_model=ReloadResponse,
             dependencies=[Depends(require_admin)],
             responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
async def reload(store: Annotated[ModelStore, Depends(get_store)]) -> ReloadResponse:
    """Scan MODEL_DIR now (the background poll does the same every POLL_SECONDS). A reload
    asked for while one runs shares its result; waiting holds no worker thread."""
    result = await asyncio.wrap_future(store.reload("admin"))
    return ReloadResponse(model_version=result.model_version, changed=result.changed,
                          failed_versions={str(v): reason for v, reason in result.failed.items()},
                          loaded_versions=result.loaded)


# ---- the live service: items and events written while serving ----

def _live(request: Request) -> LiveState:
    live: LiveState = request.app.state.live
    if live.db is None:
        raise HTTPException(503, "no database is configured (DATABASE_URL=none): the served "
                                 "catalog is read-only")
    return live


def _item_state(store: ModelStore, item_id: str) -> str | None:
    """live | withdrawn | exported (in a loaded version's catalog) | None (unknown)."""
    live = store.live
    if item_id in live.items:
        return "live"
    if item_id in live.withdrawn:
        return "withdrawn"
    for version in store.loaded_versions:
        model = store.get(version)
        if model is not None and item_id in model.embedding_row:
            return "exported"
    return None


async def _write_items(request: Request, puts: list[tuple], deletes: list[str]
                       ) -> ItemsWritten:
    """Write item changes (one transaction), then apply them here before answering: every
    loaded version has placed the items put (its item tower) and dropped those withdrawn."""
    live = _live(request)
    await asyncio.to_thread(live.db.change_items, puts, deletes)  # DatabaseError: 503
    request.app.state.metrics.live_writes.labels("item").inc(len(puts) + len(deletes))
    await _apply_written(live)
    store: ModelStore = request.app.state.store
    placed, not_placed = [], {}
    for version in store.loaded_versions:
        model = store.get(version)
        if model is not None and model.view is not None:
            if model.view.embedder is not None and not model.view.failed:
                placed.append(version)
            else:
                not_placed[str(version)] = model.view.failed or "no item_tower"
    return ItemsWritten(put=list(dict.fromkeys(row[0] for row in puts)), deleted=deletes,
                        placed_by=placed if puts else [], not_placed=not_placed if puts else {})


async def _apply_written(live: LiveState) -> None:
    """Read back what was just committed (with anything other processes wrote before it). If
    the database fails now, the write stands and the poll applies it later: not an error."""
    try:
        await asyncio.to_thread(live.sync)
    except DatabaseError as error:
        live.last_error = str(error)
        log.warning("written, but reading it back failed (the poll retries): %s", error)


def _item_row(item_id: str, body: ItemIn) -> tuple:
    return (item_id, body.text, body.category, body.brand, body.price)


@router.put("/items/{item_id}", response_model=ItemsWritten,
            dependencies=[Depends(require_admin)], responses={**ADMIN, **WRITE_FAILED})
async def put_item(request: Request, item_id: Annotated[str, PathParam(min_length=1,
                                                                        max_length=256)],
                   body: ItemIn) -> ItemsWritten:
    """Add or change an item (admin). When this answers, the item is recommendable, findable
    and similar-able on every loaded version with an item tower, here; other API processes
    on the same database follow within their poll (0.2 s). A withdrawn item put again comes
    back."""
    return await _write_items(request, [_item_row(item_id, body)], [])


@router.delete("/items/{item_id}", response_model=ItemsWritten,
               dependencies=[Depends(require_admin)],
               responses={404: {"model": ErrorResponse, "description": "unknown item"},
                          **ADMIN, **WRITE_FAILED})
async def delete_item(request: Request,
                      item_id: Annotated[str, PathParam(min_length=1, max_length=256)]
                      ) -> ItemsWritten:
    """Withdraw an item, exported or live (admin): never returned again from this answer on.
    Withdrawing a withdrawn item again is a no-op (200)."""
    if _item_state(request.app.state.store, item_id) is None:
        raise HTTPException(404, f"unknown item_id {item_id!r}: in no loaded version's "
                                 "catalog and never put")
    return await _write_items(request, [], [item_id])


@router.post("/items/bulk", response_model=ItemsWritten, dependencies=[Depends(require_admin)],
             responses={422: {"description": "a malformed item, or a delete of an unknown "
                                             "item (nothing written)"},
                        **ADMIN, **WRITE_FAILED})
async def bulk_items(request: Request, body: BulkItemsRequest) -> ItemsWritten:
    """Put and withdraw many items in one transaction (admin): all applied or none."""
    store: ModelStore = request.app.state.store
    unknown = [(i, item) for i, item in enumerate(body.delete)
               if _item_state(store, item) is None and item not in {p.item_id for p in body.put}]
    if unknown:
        raise RequestValidationError([{"type": "unknown_item", "loc": ["body", "delete", i],
                                       "msg": f"unknown item_id {item!r}", "input": item}
                                      for i, item in unknown[:20]])
    return await _write_items(request, [_item_row(item.item_id, item) for item in body.put],
                              list(dict.fromkeys(body.delete)))


@router.post("/events", response_model=EventsWritten, dependencies=[Depends(require_admin)],
             responses={422: {"description": "a malformed event, or one naming an unknown or "
                                             "withdrawn item (nothing written)"},
                        **ADMIN, **WRITE_FAILED})
async def post_events(request: Request, body: EventsRequest | EventIn) -> EventsWritten:
    """Record what users did, one event or a batch (admin): GET /recommendations/{user_id}
    answers from the export's history plus these, newest last, and leaves their items out.
    An unknown user becomes known with their first event. `prepare_data.py --source events`
    reads them back for the next training run."""
    events = body.events if isinstance(body, EventsRequest) else [body]
    live = _live(request)
    store: ModelStore = request.app.state.store
    bad = []
    for i, event in enumerate(events):
        state = _item_state(store, event.item_id)
        if state in (None, "withdrawn"):
            loc = ["body", "events", i, "item_id"] if isinstance(body, EventsRequest) else [
                "body", "item_id"]
            bad.append({"type": f"{state or 'unknown'}_item", "loc": loc,
                        "msg": f"{'withdrawn' if state else 'unknown'} item_id "
                               f"{event.item_id!r}", "input": event.item_id})
    if bad:
        raise RequestValidationError(bad[:20])
    now = time.time()
    rows = [(e.user_id, e.item_id, e.event_type, now if e.timestamp is None else e.timestamp)
            for e in events]
    await asyncio.to_thread(live.db.add_events, rows)  # DatabaseError: 503
    request.app.state.metrics.live_writes.labels("event").inc(len(rows))
    await _apply_written(live)
    return EventsWritten(events=len(rows))


@router.get("/live", response_model=LiveResponse)
async def live_status(request: Request) -> LiveResponse:
    """The database, what has changed since the exports, recent item changes (newest first),
    and the loaded versions that cannot place new items."""
    live: LiveState = request.app.state.live
    store: ModelStore = request.app.state.store
    model = store.current
    recent = []
    for item_id, op in reversed(live.recent):
        record = live.item(item_id)
        if op == "delete" or record is None:
            title = model.titles.get(item_id, "") if model is not None else ""
            recent.append(LiveItemOut(item_id=item_id, title=title, category="", brand="",
                                      price=None, status="withdrawn"))
        else:
            exported = model is not None and item_id in model.embedding_row
            recent.append(LiveItemOut(item_id=item_id, title=record.text,
                                      category=record.category, brand=record.brand,
                                      price=record.price,
                                      status="changed" if exported else "new"))
    not_placed = {}
    for version in store.loaded_versions:
        loaded = store.get(version)
        if loaded is not None and loaded.view is not None and loaded.view.failed:
            not_placed[str(version)] = loaded.view.failed
    return LiveResponse(database=describe(live.db.url) if live.db else None,
                        schema_version=live.db.schema_version if live.db else None,
                        error=live.last_error or None, live_items=len(live.items),
                        withdrawn=len(live.withdrawn), events=live.events_applied,
                        not_placed=not_placed, recent=recent)


async def _database_error(request: Request, error: DatabaseError) -> JSONResponse:
    return JSONResponse({"detail": f"database unavailable, nothing written: {error}"},
                        status_code=503)  # raised only by the write itself (one transaction)


async def _model_error(request: Request, error: ModelError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503)


ECHO_MAX_CHARS = 120  # 422 details quote at most this much of the offending input


def _short(value: Any) -> Any:
    """An input as a 422 detail quotes it: small values as they are, large ones summarised."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    if len(text) <= ECHO_MAX_CHARS:
        return value
    kind = type(value).__name__
    size = f"{len(value):,} entries" if isinstance(value, (list, dict)) else f"{len(text):,} chars"
    return f"<{kind} of {size}, not echoed>"


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    """FastAPI's 422 body with the inputs shortened (a 5 MB body is not echoed back) and
    ASCII-escaped (the default fails with a 500 on text UTF-8 cannot encode, such as a lone
    surrogate sent as "\\ud800")."""
    details = []
    for item in error.errors():
        item = {key: value for key, value in item.items() if key not in ("url", "ctx")}
        if "input" in item:
            item["input"] = _short(item["input"])
        details.append(item)
    body = json.dumps({"detail": details}, ensure_ascii=True, default=str)
    return Response(body, status_code=422, media_type="application/json")


async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    """A body FastAPI could not parse is the client's fault and gets a 422 naming why, not
    FastAPI's generic 400."""
    cause = error.__cause__
    if error.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError)):
        message = (f"request body is not valid UTF-8 (byte {cause.start})"
                   if isinstance(cause, UnicodeDecodeError) else
                   "request body JSON is nested too deeply")
        return JSONResponse({"detail": [{"type": "body_invalid", "loc": ["body"],
                                         "msg": message}]}, status_code=422)
    return await http_exception_handler(request, error)


def create_app(model_dir: Path | str, index: str = "scann", poll_seconds: float = 10.0,
               policy: VersionPolicy | str = "latest", admin_token: str | None = None,
               access_log: bool = False, max_body_bytes: int = MAX_BODY_BYTES,
               keep_versions: int = 2, ab_split: TrafficSplit | str | None = None,
               database_url: str | None = None) -> FastAPI:
    """An app serving the versions `policy` picks under model_dir (the newest `keep_versions`
    under `latest`) plus those `ab_split` names; loading happens at startup. Items and events
    written while serving live in `database_url` (default: SQLite beside model_dir; "none":
    a read-only catalog)."""
    if isinstance(policy, str):
        policy = VersionPolicy.parse(policy)
    policy = policy.with_keep(keep_versions)
    if isinstance(ab_split, str):
        ab_split = TrafficSplit.parse(ab_split)
    metrics = ServingMetrics()
    metrics.serving_index(index, INDEXES)
    url = database_url or default_url(Path(model_dir))
    live = LiveState(None if url == "none" else Database(url))
    store = ModelStore(Path(model_dir), index, poll_seconds, policy, metrics,
                       extra=ab_split.versions if ab_split else (), live=live)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(live.start)  # the live items first: versions place them
        await asyncio.to_thread(store.start)
        try:
            yield
        finally:
            store.stop()
            live.stop()

    app = FastAPI(title="towerrec", lifespan=lifespan, max_body_size=max_body_bytes,
                  description="Two-tower sequential recommendations: retrieval (ScaNN or "
                              "brute force), ranking, similar items.")
    app.state.store, app.state.metrics, app.state.admin_token = store, metrics, admin_token
    app.state.split, app.state.live = ab_split, live
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(ModelError, _model_error)
    app.add_exception_handler(DatabaseError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, access_log_enabled=access_log)
    return app


def _env_number(name: str, default: float, kind=float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r}: expected a {kind.__name__}") from error


def create_app_from_env() -> FastAPI:
    return create_app(os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
                      os.environ.get("INDEX", "scann"), _env_number("POLL_SECONDS", 10.0),
                      os.environ.get("MODEL_VERSION", "latest"),
                      os.environ.get("ADMIN_TOKEN") or None,
                      os.environ.get("ACCESS_LOG", "").lower() in ("1", "true", "json", "on"),
                      int(_env_number("MAX_BODY_BYTES", MAX_BODY_BYTES, int)),
                      int(_env_number("KEEP_VERSIONS", 2, int)),
                      os.environ.get("AB_SPLIT") or None,
                      os.environ.get("DATABASE_URL") or None)


def __getattr__(name: str) -> FastAPI:
    """`serving.app.app`, built from the environment on first access (PEP 562)."""
    if name == "app":
        globals()["app"] = create_app_from_env()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
