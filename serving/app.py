"""The recommendation API: FastAPI endpoints over the current exported model version.

`create_app(model_dir, ...)` builds an app whose startup loads the VERSION the policy picks
under model_dir and polls for others. The module attribute `app` is built from the environment
(MODEL_DIR, INDEX, POLL_SECONDS, MODEL_VERSION, KEEP_VERSIONS, AB_SPLIT, ADMIN_TOKEN,
ACCESS_LOG, MAX_BODY_BYTES) on first access, so `uvicorn main:app` works and importing this
module for tests loads nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.contract import HISTORY_MAX
from serving.metrics import RequestMetricsMiddleware, ServingMetrics
from serving.model_store import INDEXES, ModelError, ModelStore, ServingModel, VersionPolicy
from serving.schemas import (
    K_MAX,
    ErrorResponse,
    HealthResponse,
    HistoryItem,
    HistoryResponse,
    ItemSearchResponse,
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

DEFAULT_MODEL_DIR = "saved_model/sample"
STATIC = Path(__file__).resolve().parent / "static"  # the browser page
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a 1,000-item history of 256-character ids is ~260 KB
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
UNAVAILABLE = {503: {"model": ErrorResponse, "description": "no model loaded, or it failed"}}

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


def _scored(model: ServingModel, pairs: list[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(item_id=item, title=model.titles.get(item, ""), score=score)
            for item, score in pairs]


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def recommend(model: ServingModel, metrics: ServingMetrics, user_id: str | None,
                    history: list[str], event_types: list[str] | None, k: int,
                    exclude_seen: bool, rerank: bool, stored: bool = False) -> Response:
    """Retrieve (and optionally re-rank) for a raw history; the most popular items when no item
    of it is known. `stored`: a history from the version's own user table, all catalog ids.

    Answers pre-serialised JSON: the response model is built once here, so FastAPI does not
    validate it a second time on the way out (the endpoint's response_model documents it)."""
    if stored:
        known, kinds, unknown = history, event_types, []
    else:
        known, kinds, unknown = model.known_history(history, event_types)
        metrics.unknown_items.inc(len(unknown))
    metrics.answers.labels(version=str(model.version)).inc()
    if not known:
        metrics.fallbacks.inc()
        return _json(RecommendationsResponse(
            user_id=user_id, model_version=model.version, fallback=True,
            recommendations=_scored(model, model.popular[:k]), unknown_items=unknown))
    found, events_used = await model.retrieve_async(known, kinds, exclude_seen)
    if rerank and found:
        found, _ = await model.rank_async(known, kinds, [item for item, _ in found])
        events_used = kinds is not None
    return _json(RecommendationsResponse(
        user_id=user_id, model_version=model.version, recommendations=_scored(model, found[:k]),
        unknown_items=unknown, reranked=rerank, event_types_used=events_used))


@router.get("/recommendations/{user_id}", response_model=RecommendationsResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown user"},
                       **UNAVAILABLE})
async def recommend_user(model: Model, metrics: Metrics,
                   user_id: Annotated[str, PathParam(max_length=256)],
                   k: Annotated[int, Query(ge=1, le=K_MAX)] = 10, exclude_seen: bool = True,
                   rerank: bool = False,
                   fallback: Annotated[Literal["popular"] | None, Query(
                       description="answer an unknown user with the most popular items")] = None,
                   ) -> Response:
    """Recommendations for a known user from their stored history (newest last)."""
    stored = model.histories.get(user_id)
    if stored is None:
        if fallback != "popular":
            raise HTTPException(404, f"unknown user_id {user_id!r} (model version "
                                     f"{model.version}); pass fallback=popular to get the "
                                     "most popular items instead")
        return await recommend(model, metrics, user_id, [], None, k, exclude_seen, rerank)
    history, event_types = stored
    return await recommend(model, metrics, user_id, history, event_types, k, exclude_seen,
                           rerank, stored=user_id not in model.unclean_histories)


@router.post("/recommendations", response_model=RecommendationsResponse, responses=UNAVAILABLE)
async def recommend_session(model: Model, metrics: Metrics,
                      body: RecommendRequest) -> RecommendationsResponse:
    """Recommendations for an anonymous or live session given as raw item ids, newest last."""
    return await recommend(model, metrics, None, body.history, body.event_types, body.k,
                           body.exclude_seen, body.rerank)


@router.get("/items/{item_id}/similar", response_model=SimilarResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown item"},
                       **UNAVAILABLE})
def similar_items(model: Model, item_id: Annotated[str, PathParam(max_length=256)],
                  k: Annotated[int, Query(ge=1, le=K_MAX)] = 10) -> SimilarResponse:
    """Nearest items by cosine of the exported item vectors, the item itself excluded."""
    found = model.similar(item_id, k)
    if found is None:
        raise HTTPException(404, f"unknown item_id {item_id!r} (model version "
                                 f"{model.version})")
    return SimilarResponse(item_id=item_id, model_version=model.version,
                           similar=_scored(model, found))


@router.post("/rank", response_model=RankResponse, responses=UNAVAILABLE)
async def rank(model: Model, metrics: Metrics, body: RankRequest) -> RankResponse:
    """The ranking head's scores for candidates given a history; best first."""
    history, kinds, unknown = model.known_history(body.history, body.event_types)
    metrics.unknown_items.inc(len(unknown))
    ranked, unknown_candidates = await model.rank_async(history, kinds, body.candidates)
    return RankResponse(model_version=model.version, ranked=_scored(model, ranked),
                        unknown_candidates=unknown_candidates, unknown_items=unknown)


@router.get("/users/{user_id}/history", response_model=HistoryResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown user"},
                       **UNAVAILABLE})
async def user_history(model: Model, user_id: Annotated[str, PathParam(max_length=256)],
                       limit: Annotated[int, Query(ge=1, le=HISTORY_MAX)] = 50,
                       ) -> HistoryResponse:
    """A known user's stored events (the input of GET /recommendations/{user_id}), newest
    first; the same version answers as for that user's recommendations."""
    stored = model.histories.get(user_id)
    if stored is None:
        raise HTTPException(404, f"unknown user_id {user_id!r} (model version "
                                 f"{model.version})")
    history, kinds = stored
    newest = [HistoryItem(item_id=item, title=model.titles.get(item, ""), event_type=kind)
              for item, kind in zip(reversed(history), reversed(kinds), strict=True)]
    return HistoryResponse(user_id=user_id, model_version=model.version, history=newest[:limit])


@router.get("/users", response_model=UsersResponse, responses=UNAVAILABLE)
async def users(model: Model, prefix: Annotated[str, Query(max_length=256)] = "",
                limit: Annotated[int, Query(ge=1, le=K_MAX)] = 20) -> UsersResponse:
    """Stored user ids starting with `prefix` (for pickers)."""
    return UsersResponse(model_version=model.version, user_ids=model.users(prefix, limit))


@router.get("/items", response_model=ItemSearchResponse, responses=UNAVAILABLE)
def search_items(model: Model, q: Annotated[str, Query(min_length=1, max_length=256)],
                 limit: Annotated[int, Query(ge=1, le=K_MAX)] = 20) -> ItemSearchResponse:
    """Catalog items whose id or title contains `q` (case-insensitive), most popular first."""
    return ItemSearchResponse(model_version=model.version,
                              items=_scored(model, model.search(q, limit)))


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


@router.get("/metadata", response_model=MetadataResponse, responses=UNAVAILABLE)
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
async def prometheus_metrics(metrics: Metrics) -> Response:
    """Prometheus text format: requests and latency per route and status, model version,
    loads, reloads, popular fallbacks, unknown item ids, the index in use."""
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
               keep_versions: int = 2, ab_split: TrafficSplit | str | None = None) -> FastAPI:
    """An app serving the versions `policy` picks under model_dir (the newest `keep_versions`
    under `latest`) plus those `ab_split` names; loading happens at startup."""
    if isinstance(policy, str):
        policy = VersionPolicy.parse(policy)
    policy = policy.with_keep(keep_versions)
    if isinstance(ab_split, str):
        ab_split = TrafficSplit.parse(ab_split)
    metrics = ServingMetrics()
    metrics.serving_index(index, INDEXES)
    store = ModelStore(Path(model_dir), index, poll_seconds, policy, metrics,
                       extra=ab_split.versions if ab_split else ())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(store.start)
        try:
            yield
        finally:
            store.stop()

    app = FastAPI(title="towerrec", lifespan=lifespan, max_body_size=max_body_bytes,
                  description="Two-tower sequential recommendations: retrieval (ScaNN or "
                              "brute force), ranking, similar items.")
    app.state.store, app.state.metrics, app.state.admin_token = store, metrics, admin_token
    app.state.split = ab_split
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(ModelError, _model_error)
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
                      os.environ.get("AB_SPLIT") or None)


def __getattr__(name: str) -> FastAPI:
    """`serving.app.app`, built from the environment on first access (PEP 562)."""
    if name == "app":
        globals()["app"] = create_app_from_env()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
