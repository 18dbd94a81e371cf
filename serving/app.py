"""The recommendation API: FastAPI endpoints over the current exported model version.

`create_app(model_dir, index, poll_seconds)` builds an app whose startup loads the newest VERSION
under model_dir and polls for newer ones. The module attribute `app` is built from the
environment (MODEL_DIR, INDEX, POLL_SECONDS) on first access, so `uvicorn main:app` works and
importing this module for tests loads nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.model_store import ModelError, ModelStore, ServingModel
from serving.schemas import (
    K_MAX,
    ErrorResponse,
    HealthResponse,
    MetadataResponse,
    RankRequest,
    RankResponse,
    ReadyResponse,
    RecommendationsResponse,
    RecommendRequest,
    ReloadResponse,
    ScoredItem,
    SimilarResponse,
)

DEFAULT_MODEL_DIR = "saved_model/sample"
UNAVAILABLE = {503: {"model": ErrorResponse, "description": "no model loaded, or it failed"}}

router = APIRouter()


async def get_store(request: Request) -> ModelStore:
    return request.app.state.store


async def current_model(request: Request) -> ServingModel:
    """The model a request uses from start to end (async: no thread hop just to read it)."""
    model = request.app.state.store.current
    if model is None:
        raise HTTPException(503, "no model version is loaded yet; see GET /ready")
    return model


Model = Annotated[ServingModel, Depends(current_model)]


def _scored(model: ServingModel, pairs: list[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(item_id=item, title=model.titles.get(item, ""), score=score)
            for item, score in pairs]


def known_history(model: ServingModel, history: list[str], event_types: list[str] | None):
    """(catalog items of the history, their event types, unknown ids once each). Unknown ids
    are dropped here, as the graph would ignore them anyway; "" is padding, not unknown."""
    keep = [i for i, item in enumerate(history) if item in model.titles]
    unknown = list(dict.fromkeys(item for item in history if item and item not in model.titles))
    kinds = [event_types[i] for i in keep] if event_types is not None else None
    return [history[i] for i in keep], kinds, unknown


def recommend(model: ServingModel, user_id: str | None, history: list[str],
              event_types: list[str] | None, k: int, exclude_seen: bool,
              rerank: bool) -> RecommendationsResponse:
    """Retrieve (and optionally re-rank) for a raw history; the most popular items when no item
    of it is known."""
    known, kinds, unknown = known_history(model, history, event_types)
    if not known:
        return RecommendationsResponse(
            user_id=user_id, model_version=model.version, fallback=True,
            recommendations=_scored(model, model.popular[:k]), unknown_items=unknown)
    found, events_used = model.retrieve(known, kinds, exclude_seen)
    if rerank and found:
        found, _ = model.rank(known, kinds, [item for item, _ in found])
        events_used = kinds is not None
    return RecommendationsResponse(
        user_id=user_id, model_version=model.version, recommendations=_scored(model, found[:k]),
        unknown_items=unknown, reranked=rerank, event_types_used=events_used)


@router.get("/recommendations/{user_id}", response_model=RecommendationsResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown user"},
                       **UNAVAILABLE})
def recommend_user(model: Model, user_id: Annotated[str, PathParam(max_length=256)],
                   k: Annotated[int, Query(ge=1, le=K_MAX)] = 10, exclude_seen: bool = True,
                   rerank: bool = False,
                   fallback: Annotated[Literal["popular"] | None, Query(
                       description="answer an unknown user with the most popular items")] = None,
                   ) -> RecommendationsResponse:
    """Recommendations for a known user from their stored history (newest last)."""
    stored = model.histories.get(user_id)
    if stored is None:
        if fallback != "popular":
            raise HTTPException(404, f"unknown user_id {user_id!r} (model version "
                                     f"{model.version}); pass fallback=popular to get the "
                                     "most popular items instead")
        return recommend(model, user_id, [], None, k, exclude_seen, rerank)
    history, event_types = stored
    return recommend(model, user_id, history, event_types, k, exclude_seen, rerank)


@router.post("/recommendations", response_model=RecommendationsResponse, responses=UNAVAILABLE)
def recommend_session(model: Model, body: RecommendRequest) -> RecommendationsResponse:
    """Recommendations for an anonymous or live session given as raw item ids, newest last."""
    return recommend(model, None, body.history, body.event_types, body.k, body.exclude_seen,
                     body.rerank)


@router.get("/items/{item_id}/similar", response_model=SimilarResponse,
            responses={404: {"model": ErrorResponse, "description": "unknown item"},
                       **UNAVAILABLE})
def similar_items(model: Model, item_id: Annotated[str, PathParam(max_length=256)],
                  k: Annotated[int, Query(ge=1, le=K_MAX)] = 10) -> SimilarResponse:
    """Nearest items by cosine similarity of item-tower vectors, the item itself excluded."""
    found = model.similar(item_id, k)
    if found is None:
        raise HTTPException(404, f"unknown item_id {item_id!r} (model version "
                                 f"{model.version})")
    return SimilarResponse(item_id=item_id, model_version=model.version,
                           similar=_scored(model, found))


@router.post("/rank", response_model=RankResponse, responses=UNAVAILABLE)
def rank(model: Model, body: RankRequest) -> RankResponse:
    """The ranking head's scores for candidates given a history; best first."""
    history, kinds, unknown = known_history(model, body.history, body.event_types)
    ranked, unknown_candidates = model.rank(history, kinds, body.candidates)
    return RankResponse(model_version=model.version, ranked=_scored(model, ranked),
                        unknown_candidates=unknown_candidates, unknown_items=unknown)


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
        return ReadyResponse(ready=False, index=store.index,
                             detail=f"no loadable model version under {store.model_dir}")
    return ReadyResponse(ready=True, model_version=model.version, index=model.index)


@router.get("/metadata", response_model=MetadataResponse, responses=UNAVAILABLE)
async def metadata(model: Model) -> MetadataResponse:
    """The served version: data set, test metrics, index parameters, library versions."""
    meta = model.metadata
    fields = ("data_source", "data_manifest", "test_metrics", "max_seq_len", "embedding_dim",
              "default_event_type", "scann", "created", "versions")
    return MetadataResponse(model_version=model.version, index=model.index, k=model.k,
                            event_types=meta.get("event_types") or [],
                            **{name: meta.get(name) for name in fields})


@router.post("/admin/reload", response_model=ReloadResponse)
def reload(store: Annotated[ModelStore, Depends(get_store)]) -> ReloadResponse:
    """Look for a newer version now (the background poll does the same every POLL_SECONDS)."""
    result = store.refresh()
    return ReloadResponse(model_version=result.model_version, changed=result.changed,
                          failed_versions={str(v): reason for v, reason in result.failed.items()})


async def _model_error(request: Request, error: ModelError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503)


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    """FastAPI's 422 body, ASCII-escaped: its default echoes the input and fails (500) on
    text UTF-8 cannot encode, such as a lone surrogate sent as "\\ud800"."""
    body = json.dumps({"detail": jsonable_encoder(error.errors())}, ensure_ascii=True)
    return Response(body, status_code=422, media_type="application/json")


def create_app(model_dir: Path | str, index: str = "scann",
               poll_seconds: float = 10.0) -> FastAPI:
    """An app serving the newest version under model_dir; loading happens at startup."""
    store = ModelStore(Path(model_dir), index, poll_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        try:
            yield
        finally:
            store.stop()

    app = FastAPI(title="towerrec", lifespan=lifespan,
                  description="Two-tower sequential recommendations: retrieval (ScaNN or "
                              "brute force), ranking, similar items.")
    app.state.store = store
    app.include_router(router)
    app.add_exception_handler(ModelError, _model_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        return float(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from error


def create_app_from_env() -> FastAPI:
    return create_app(os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
                      os.environ.get("INDEX", "scann"), _env_float("POLL_SECONDS", 10.0))


def __getattr__(name: str) -> FastAPI:
    """`serving.app.app`, built from the environment on first access (PEP 562)."""
    if name == "app":
        globals()["app"] = create_app_from_env()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
