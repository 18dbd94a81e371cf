"""Pydantic models for every request and response of the serving API.

The constraints here are the API's input checks: FastAPI turns a violation into a 422 whose
`detail[].loc` names the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from export.contract import HISTORY_MAX

K_MAX = 100
CANDIDATES_MAX = 1000
ID_MAX_CHARS = 256

ItemId = Annotated[str, Field(max_length=ID_MAX_CHARS)]
EventType = Annotated[str, Field(max_length=64)]
K = Annotated[int, Field(ge=1, le=K_MAX, strict=True,
                         description=f"number of results, 1..{K_MAX}")]


class _WithHistory(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a default

    history: list[ItemId] = Field(
        max_length=HISTORY_MAX,
        description="raw item ids, oldest first (newest last); unknown ids are ignored and "
                    "listed in `unknown_items`, \"\" is padding")
    event_types: list[EventType] | None = Field(
        default=None, max_length=HISTORY_MAX,
        description="one event type per history entry (e.g. view, purchase), optional")

    @field_validator("event_types")
    @classmethod
    def _events_align(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        history = info.data.get("history")
        if value is not None and history is not None and len(value) != len(history):
            raise ValueError(f"event_types has {len(value)} entries but history has "
                             f"{len(history)}; give one event type per history item")
        return value


FILTER_MAX = 10_000  # entries in one filter list


class Filter(BaseModel):
    """Which items may come back; an empty or missing list imposes nothing. Applied inside
    retrieval: `k` results come back whenever that many items pass."""

    model_config = ConfigDict(extra="forbid")

    include_categories: list[ItemId] = Field(default=[], max_length=FILTER_MAX)
    exclude_categories: list[ItemId] = Field(default=[], max_length=FILTER_MAX)
    include_brands: list[ItemId] = Field(default=[], max_length=FILTER_MAX)
    exclude_brands: list[ItemId] = Field(default=[], max_length=FILTER_MAX)
    include_items: list[ItemId] = Field(default=[], max_length=FILTER_MAX)
    exclude_items: list[ItemId] = Field(default=[], max_length=FILTER_MAX)


class RecommendRequest(_WithHistory):
    """An anonymous or live session: recommendations from a raw history."""

    k: K = 10
    filter: Filter | None = None
    exclude_seen: StrictBool = Field(default=True,
                                     description="leave out items in the history")
    rerank: StrictBool = Field(default=False,
                         description="re-order the retrieved candidates by the ranking head")

    model_config = {"json_schema_extra": {"examples": [
        {"history": ["SKU0001", "SKU0002"], "event_types": ["view", "purchase"], "k": 5}]}}


class RankRequest(_WithHistory):
    """Candidates to order for a history by the ranking head."""

    candidates: list[ItemId] = Field(min_length=1, max_length=CANDIDATES_MAX)

    model_config = {"json_schema_extra": {"examples": [
        {"history": ["SKU0001", "SKU0002"], "candidates": ["SKU0003", "SKU0010"]}]}}


class ScoredItem(BaseModel):
    item_id: str
    title: str = Field(description="the item's text from items.parquet")
    score: float


class RecommendationsResponse(BaseModel):
    user_id: str | None = Field(description="null for a POSTed history")
    model_version: int
    recommendations: list[ScoredItem]
    fallback: bool = Field(
        default=False,
        description="true when these are the most popular items (unknown user or no known "
                    "item in the history); the score is then the item's training count")
    unknown_items: list[str] = Field(default_factory=list,
                                     description="history ids not in this model's catalog")
    reranked: bool = False
    event_types_used: bool = Field(
        default=False,
        description="whether the request's event types reached the model (without them "
                    "every history item counts as the training data's most common event type)")


class SimilarResponse(BaseModel):
    item_id: str
    model_version: int
    similar: list[ScoredItem] = Field(description="cosine similarity of item-tower vectors")


class RankResponse(BaseModel):
    model_version: int
    ranked: list[ScoredItem] = Field(description="known candidates, best first")
    unknown_candidates: list[str] = Field(default_factory=list,
                                          description="candidates not in the catalog (unranked)")
    unknown_items: list[str] = Field(default_factory=list,
                                     description="history ids not in this model's catalog")


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    model_version: int | None = None
    index: str
    detail: str | None = None


class MetadataResponse(BaseModel):
    model_version: int
    version_policy: str = Field(description="latest, or the pinned version (MODEL_VERSION)")
    index: str
    data_source: str | None = None
    data_manifest: dict[str, Any] | None = None
    test_metrics: dict[str, Any] | None = None
    k: int
    max_seq_len: int | None = None
    embedding_dim: int | None = None
    event_types: list[str] = Field(default_factory=list)
    default_event_type: str | None = Field(
        default=None, description="assumed for history items sent without an event type")
    scann: dict[str, Any] | None = None
    created: str | None = None
    versions: dict[str, Any] | None = None


class ReloadResponse(BaseModel):
    model_version: int | None
    changed: bool = Field(description="whether this call swapped in another version")
    failed_versions: dict[str, str] = Field(
        default_factory=dict, description="versions refused (not retried), with the reason")
    loaded_versions: list[int] = Field(default_factory=list,
                                       description="versions loaded now, newest first")


class VersionsResponse(BaseModel):
    default_version: int = Field(description="the version answering without ?version= or "
                                             "a split")
    loaded_versions: list[int] = Field(description="versions ?version=N can name, newest first")
    version_policy: str
    ab_split: dict[str, float] | None = Field(
        default=None, description="version -> share of users (by a stable hash of the id)")


class HistoryItem(BaseModel):
    item_id: str
    title: str
    event_type: str


class HistoryResponse(BaseModel):
    user_id: str
    model_version: int
    history: list[HistoryItem] = Field(description="the user's stored events, newest first")


class ItemSearchResponse(BaseModel):
    model_version: int
    items: list[ScoredItem] = Field(description="catalog items whose id or title contains the "
                                                "query, most popular first (score: training "
                                                "interactions)")


class UsersResponse(BaseModel):
    model_version: int
    user_ids: list[str] = Field(description="stored user ids starting with the prefix, sorted")


class ErrorResponse(BaseModel):
    detail: str


# ---- the live service: items and events written while serving ----
TEXT_MAX_CHARS = 10_000
BULK_MAX = 10_000
EVENTS_MAX = 10_000


class ItemIn(BaseModel):
    """A new or changed item: its text and metadata (placed by each version's item tower)."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=TEXT_MAX_CHARS,
                      description="the item's text (title, description), as in items.parquet")
    category: ItemId = ""
    brand: ItemId = ""
    price: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class BulkItem(ItemIn):
    item_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_CHARS)]


class BulkItemsRequest(BaseModel):
    """Items to put and to withdraw, in one transaction: all applied or none."""

    model_config = ConfigDict(extra="forbid")

    put: list[BulkItem] = Field(default=[], max_length=BULK_MAX)
    delete: list[Annotated[str, Field(min_length=1, max_length=ID_MAX_CHARS)]] = Field(
        default=[], max_length=BULK_MAX)


class ItemsWritten(BaseModel):
    put: list[str]
    deleted: list[str]
    placed_by: list[int] = Field(description="loaded versions whose item tower placed the "
                                             "items put (others cannot recommend them)")
    not_placed: dict[str, str] = Field(default={}, description="version -> why not")


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_CHARS)]
    item_id: Annotated[str, Field(min_length=1, max_length=ID_MAX_CHARS)]
    event_type: Annotated[str, Field(min_length=1, max_length=64)] = "purchase"
    timestamp: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                    description="seconds since 1970 (default: now)")


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=EVENTS_MAX)


class EventsWritten(BaseModel):
    events: int


class LiveItemOut(BaseModel):
    item_id: str
    title: str
    category: str
    brand: str
    price: float | None
    status: str = Field(description="new | changed | withdrawn")


class LiveResponse(BaseModel):
    database: str | None = Field(description="the database, password hidden; null: none")
    schema_version: int | None
    error: str | None = Field(description="the last error reading the database, if any")
    live_items: int
    withdrawn: int
    events: int
    not_placed: dict[str, str] = Field(description="loaded version -> why it cannot place "
                                                   "new items")
    recent: list[LiveItemOut] = Field(description="items put or withdrawn, newest first")
