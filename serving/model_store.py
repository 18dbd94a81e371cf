"""The API's model holder: load one exported VERSION, keep the current one, swap in others as
the version policy says.

A version is loaded and warmed up completely, on the store's own loader thread, before a single
reference assignment makes it current: a request that grabbed the old model finishes on it and
none sees a half-loaded one, and no request thread ever waits for a load. Loads are
single-flight: a reload asked for while one runs shares that one's result. A version that fails
to load is logged, refused and remembered (not retried until its directory is replaced); the
previous version keeps serving. The policy (TF Serving's, in small): `latest` serves the newest
loadable version and never goes back by itself; a pinned version serves that one only. A served
version whose directory disappears keeps serving from memory, with a WARNING.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import gc
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from export import contract as c
from serving.batching import Batcher, run_batch

log = logging.getLogger(__name__)

INDEXES = ("scann", "bruteforce")
POPULAR_MAX = 100
# Up to this many live items are scored for a batch on the model's thread; more, beside it.
LIVE_INLINE_ROWS = 2_000


class ModelError(RuntimeError):
    """A model call failed; the API answers 503 with this message."""


class VersionLoadError(RuntimeError):
    """An exported version is incomplete or broken."""


def import_index_ops(index: str) -> None:
    """The ScaNN SavedModel needs scann's custom ops registered; brute force must not need them."""
    if index not in INDEXES:
        raise ValueError(f"INDEX={index!r}: expected one of {', '.join(INDEXES)}")
    if index == "scann":
        try:
            import scann  # noqa: F401  (registers the Scann>... TF ops)
        except ImportError as error:
            raise RuntimeError(f"INDEX=scann but scann cannot be imported ({error}); install "
                               "the scann wheel built for this TensorFlow, or set "
                               "INDEX=bruteforce") from error


VERSION_NAME = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also accepts "²" or "٣"


def list_versions(model_dir: Path, warned: set[str] | None = None) -> list[tuple[int, Path]]:
    """VERSION dirs under model_dir, newest first. Export's own `tf_serving/` and hidden
    `.tmp-*` dirs are skipped silently; any other name that is not ASCII digits is ignored with
    one WARNING (per name, when `warned` remembers them)."""
    try:
        entries = list(model_dir.iterdir())
    except OSError as error:
        log.warning("cannot list MODEL_DIR %s: %s", model_dir, error)
        return []
    versions = []
    for path in entries:
        name = path.name
        if VERSION_NAME.fullmatch(name):
            if path.is_dir():
                versions.append((int(name), path))
        elif name != "tf_serving" and not name.startswith(".") and (
                warned is None or name not in warned):
            if warned is not None:
                warned.add(name)
            log.warning("ignoring %r in MODEL_DIR: version directories are named by ASCII "
                        "digits only", name)
    return sorted(versions, reverse=True)


@dataclass(frozen=True)
class VersionPolicy:
    """Which version answers by default: the newest (`latest`) or one pinned version number;
    and how many of the newest versions stay loaded (`keep`, for `?version=N` and splits)."""

    pinned: int | None = None
    keep: int = 2

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        text = text.strip()
        if text in ("", "latest"):
            return cls()
        if VERSION_NAME.fullmatch(text) and int(text) > 0:
            return cls(int(text))
        raise ValueError(f"MODEL_VERSION={text!r}: expected 'latest' or a version number")

    def __str__(self) -> str:
        return "latest" if self.pinned is None else str(self.pinned)

    def with_keep(self, keep: int) -> VersionPolicy:
        if keep < 1:
            raise ValueError(f"KEEP_VERSIONS={keep}: keep at least 1 version loaded")
        return VersionPolicy(self.pinned, keep)


@dataclass
class ServingModel:
    """One loaded version: the SavedModel signatures plus the precomputed lookup tables."""

    version: int
    path: Path
    index: str
    metadata: dict
    titles: dict[str, str]  # item_id -> text, every catalog item
    popular: list[tuple[str, float]]  # most popular first: (item_id, train count)
    histories: dict[str, tuple[list[str], list[str]]]  # user_id -> (history, event_types)
    # Stored users whose history names ids outside the catalog (none in a real export): only
    # these need the per-request filtering a posted history gets.
    unclean_histories: frozenset[str]
    embedding_ids: np.ndarray  # [items] str
    item_matrix: np.ndarray  # [items, dim] float32: the scored item vectors, as exported
    inv_norms: np.ndarray  # [items] float32: 1 / |item vector| (cosines for similar items)
    embedding_row: dict[str, int]
    retrieval: dict[str, Callable]
    ranking: dict[str, Callable]
    saved_models: tuple  # the loaded roots, held so their variables live as long as signatures
    counts: dict[str, float] = field(default_factory=dict)  # item_id -> training interactions
    batcher: Batcher | None = None  # the store's; None: each call runs on the caller's thread
    # per embedding row: category and brand codes (0 = none) and their vocabularies
    category_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    brand_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    categories: list[str] = field(default_factory=lambda: [""])  # code -> name
    brands: list[str] = field(default_factory=lambda: [""])
    view: object = None  # serving/live.py VersionView, attached by the store after loading
    live: object = None  # serving/live.py LiveRetrieval over that view
    live_state: object = None  # serving/live.py LiveState: live items' records, users' events

    @functools.cached_property
    def row_counts(self) -> np.ndarray:
        """Training interactions per embedding row."""
        return np.array([self.counts.get(i, 0.0) for i in self.embedding_ids.tolist()])

    def filter_mask(self, flt) -> np.ndarray:
        """Exported rows an ItemFilter lets through: bool [items]."""
        mask = np.ones(len(self.embedding_ids), bool)
        for codes, names, include, exclude in (
                (self.category_codes, self.categories, flt.include_categories,
                 flt.exclude_categories),
                (self.brand_codes, self.brands, flt.include_brands, flt.exclude_brands)):
            lookup = {name: code for code, name in enumerate(names)}
            if include:
                mask &= np.isin(codes, [lookup[n] for n in include if n in lookup])
            if exclude:
                mask &= ~np.isin(codes, [lookup[n] for n in exclude if n in lookup])
        if flt.include_items:
            keep = np.zeros_like(mask)
            keep[[self.embedding_row[i] for i in flt.include_items
                  if i in self.embedding_row]] = True
            mask &= keep
        if flt.exclude_items:
            mask[[self.embedding_row[i] for i in flt.exclude_items
                  if i in self.embedding_row]] = False
        return mask

    @property
    def max_fetch(self) -> int:
        """Most exported items one `search` call returns."""
        scann = self.metadata.get("scann") or {}
        if self.index == "scann" and scann.get("max_fetch"):
            return int(scann["max_fetch"])
        return len(self.embedding_ids)

    @property
    def index_search(self) -> Callable | None:
        """query vector [dim] -> the exported index's top `fetch` (item_id, score), nothing
        excluded; None for an export without the `search` signature."""
        signature = self.retrieval.get(c.SEARCH)
        if signature is None:
            return None

        def run(query: np.ndarray, fetch: int) -> list[tuple[str, float]]:
            try:
                out = signature(query=tf.constant(query[None], tf.float32),
                                fetch=tf.constant(int(fetch), tf.int32))
            except (tf.errors.OpError, ValueError, TypeError) as error:
                raise ModelError(f"model version {self.version} failed: search: "
                                 f"{str(error).splitlines()[0][:300]}") from error
            return self.found_items({name: value.numpy()[0] for name, value in out.items()})
        return run

    @property
    def k(self) -> int:
        return int(self.metadata["k"])

    @classmethod
    def load(cls, path: Path, version: int, index: str,
             batcher: Batcher | None = None) -> ServingModel:
        """Read and check everything a version needs, then warm every signature up once."""
        started = time.time()
        try:
            metadata = json.loads((path / c.METADATA).read_text())
            if not isinstance(metadata, dict) or not isinstance(metadata.get("k"), int):
                raise VersionLoadError("metadata.json has no integer 'k'")
            items = pd.read_parquet(path / c.ITEMS)
            vectors = pd.read_parquet(path / c.ITEM_EMBEDDINGS)
            users = pd.read_parquet(path / c.USER_HISTORIES)
            retrieval_dir = c.RETRIEVAL_SCANN if index == "scann" else c.RETRIEVAL_BRUTEFORCE
            saved_models = (tf.saved_model.load(str(path / retrieval_dir)),
                            tf.saved_model.load(str(path / c.RANKING)))
            retrieval, ranking = (dict(loaded.signatures) for loaded in saved_models)
        except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as error:
            raise VersionLoadError(f"{type(error).__name__}: {error}") from error
        for name in c.RETRIEVAL_SIGNATURES:
            if name not in retrieval:
                raise VersionLoadError(f"{retrieval_dir}/ has no signature {name!r}")
        for name in c.RANKING_SIGNATURES:
            if name not in ranking:
                raise VersionLoadError(f"{c.RANKING}/ has no signature {name!r}")
        if len(items) == 0 or len(vectors) != len(items):
            raise VersionLoadError(f"items.parquet has {len(items)} rows but "
                                   f"item_embeddings.parquet has {len(vectors)}")

        ids = items["item_id"].astype(str).to_numpy()
        texts = items["text"].fillna("").astype(str).to_numpy()
        counts = items["count"].fillna(0).to_numpy(np.float64)
        order = sorted(range(len(ids)), key=lambda i: (-counts[i], ids[i]))[:POPULAR_MAX]
        matrix = np.stack(vectors["embedding"].to_numpy()).astype(np.float32)  # [items, dim]
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        embedding_ids = vectors["item_id"].astype(str).to_numpy()
        meta = items.set_index(items["item_id"].astype(str)).reindex(embedding_ids)
        codes = {}
        for column in ("category", "brand"):
            values = (meta[column] if column in meta else pd.Series("", index=meta.index))
            values = values.fillna("").astype(str)
            names = [""] + sorted(v for v in values.unique() if v)
            codes[column] = (pd.Categorical(values, categories=names).codes.astype(np.int32),
                             names)
        titles = dict(zip(ids.tolist(), texts.tolist(), strict=True))
        histories = {str(u): ([str(x) for x in h], [str(x) for x in e])
                     for u, h, e in zip(users["user_id"], users["history"],
                                        users["event_types"], strict=True)}
        model = cls(
            version=version, path=path, index=index, metadata=metadata,
            titles=titles, popular=[(str(ids[i]), float(counts[i])) for i in order],
            histories=histories,
            unclean_histories=frozenset(u for u, (h, _) in histories.items()
                                        if not all(x in titles for x in h)),
            embedding_ids=embedding_ids, item_matrix=matrix,
            inv_norms=(1.0 / np.maximum(norms[:, 0], 1e-12)).astype(np.float32),
            category_codes=codes["category"][0], categories=codes["category"][1],
            brand_codes=codes["brand"][0], brands=codes["brand"][1],
            embedding_row={item: row for row, item in enumerate(embedding_ids.tolist())},
            retrieval=retrieval, ranking=ranking, saved_models=saved_models, batcher=batcher,
            counts=dict(zip(ids.tolist(), counts.tolist(), strict=True)))
        model.warm_up()
        log.info("loaded model version %d from %s (index %s, %d items, %d users) in %.1fs",
                 version, path, index, len(ids), len(model.histories), time.time() - started)
        return model

    def warm_up(self) -> None:
        """One call per signature: the first call of a loaded graph is slow (TF Serving's
        warmup requests, tfs#385); a version whose graphs fail here is refused."""
        first = next(iter(self.titles))
        kind = (self.metadata.get("event_types") or [""])[0]
        try:
            for exclude_seen in (True, False):
                self.retrieve([first], None, exclude_seen)
                self.retrieve([first], [kind], exclude_seen)
            self.rank([first], None, [first])
            self.rank([first], [kind], [first])
        except ModelError as error:
            raise VersionLoadError(f"warm-up failed: {error}") from error
        self.similar(first, 1)

    def _call(self, signature: Callable, post: Callable | None = None,
              post_inline: bool = False, **inputs: list[str]) -> Future:
        """Run a signature for one request (through the batcher when there is one; `post` runs
        on the batch's answers); the Future gives {output: row} or raises ModelError."""
        if self.batcher is not None:
            raw = self.batcher.submit(signature, inputs, post, post_inline)
        else:
            raw = Future()
            try:
                answers = run_batch(signature, [inputs])
                if post is not None:
                    post(answers)
                raw.set_result(answers[0])
            except BaseException as error:
                raw.set_exception(error)
        done: Future = Future()

        def finish(source: Future) -> None:
            error = source.exception()
            if error is None:
                done.set_result(source.result())
            elif isinstance(error, (tf.errors.OpError, ValueError, TypeError)):
                log.error("model version %d failed on %s: %s", self.version,
                          {name: len(values) for name, values in inputs.items()}, error)
                message = str(error).splitlines()[0][:300] if str(error) else ""
                done.set_exception(ModelError(
                    f"model version {self.version} failed: {type(error).__name__}: {message}"))
            else:
                done.set_exception(error)

        raw.add_done_callback(finish)
        return done

    def _retrieve_call(self, history: list[str], event_types: list[str] | None,
                       exclude_seen: bool) -> Future:
        used = event_types is not None
        signature = self.retrieval[c.retrieval_signature(exclude_seen, used)]
        # Live items scored with the batch, only when there are some (no cost otherwise).
        live = self.view.snapshot.n if self.view is not None else 0
        post = self.live.prefetch if live else None
        inline = live <= LIVE_INLINE_ROWS
        if used:
            return self._call(signature, post, inline, history=history,
                              event_types=event_types)
        return self._call(signature, post, inline, history=history)

    def live_retrieve_call(self, history: list[str], event_types: list[str] | None,
                           exclude_seen: bool, live_vectors: np.ndarray) -> Future | None:
        """Retrieval for a history that holds items added while serving, with their vectors
        (`live_vectors` [len(history), score_dim], zeros for the others); None when this
        version's export has no such signature."""
        signature = self.retrieval.get(c.live_signature(exclude_seen))
        if signature is None:
            return None
        kinds = event_types if event_types is not None else [""] * len(history)
        live = self.view.snapshot.n if self.view is not None else 0
        return self._call(signature, self.live.prefetch if live else None,
                          live <= LIVE_INLINE_ROWS, history=history, event_types=kinds,
                          live_vectors=live_vectors)

    def known_history(self, history: list[str], event_types: list[str] | None):
        """(catalog items of the history, their event types, unknown ids once each). Unknown
        ids are dropped here, as the graph would ignore them anyway; "" is padding."""
        keep = [i for i, item in enumerate(history) if item in self.titles]
        unknown = list(dict.fromkeys(item for item in history
                                     if item and item not in self.titles))
        kinds = [event_types[i] for i in keep] if event_types is not None else None
        return [history[i] for i in keep], kinds, unknown

    @staticmethod
    def query_of(out: dict[str, np.ndarray]) -> np.ndarray | None:
        """The query vector retrieval scored with (None from an export without it)."""
        query = out.get(c.QUERY)
        return None if query is None else np.asarray(query, np.float32)

    @staticmethod
    def found_items(out: dict[str, np.ndarray]) -> list[tuple[str, float]]:
        """A retrieval output row as (item_id, score) pairs, unfilled slots dropped."""
        pairs = zip(out[c.ITEM_IDS], out[c.SCORES], strict=True)
        return [(item.decode(), float(score)) for item, score in pairs if c.is_filled(score)]

    def retrieve(self, history: list[str], event_types: list[str] | None,
                 exclude_seen: bool) -> tuple[list[tuple[str, float]], bool]:
        """Top metadata-k (item_id, score) for a history, best first, and whether event types
        were used."""
        out = self._retrieve_call(history, event_types, exclude_seen).result()
        return self.found_items(out), event_types is not None

    async def retrieve_async(self, history: list[str], event_types: list[str] | None,
                             exclude_seen: bool):
        """retrieve() for the event loop (waiting holds no thread), plus the query vector."""
        out = await asyncio.wrap_future(self._retrieve_call(history, event_types, exclude_seen))
        return self.found_items(out), event_types is not None, self.query_of(out), out

    def _rank_call(self, history: list[str], event_types: list[str] | None,
                   candidates: list[str]) -> Future:
        signature = self.ranking[c.ranking_signature(event_types is not None)]
        if event_types is not None:
            return self._call(signature, history=history, event_types=event_types,
                              candidates=candidates)
        return self._call(signature, history=history, candidates=candidates)

    @staticmethod
    def _ranked(candidates: list[str], out: dict[str, np.ndarray]):
        rows = list(zip(candidates, out[c.SCORES].tolist(), out[c.KNOWN].tolist(), strict=True))
        scored = [(item, score) for item, score, known in rows if known]
        unknown = [item for item, _, known in rows if not known]
        return sorted(scored, key=lambda pair: -pair[1]), unknown

    def rank(self, history: list[str], event_types: list[str] | None,
             candidates: list[str]) -> tuple[list[tuple[str, float]], list[str]]:
        """(known candidates with ranking-head scores best first, unknown candidates)."""
        return self._ranked(candidates,
                            self._rank_call(history, event_types, candidates).result())

    async def rank_async(self, history: list[str], event_types: list[str] | None,
                         candidates: list[str]) -> tuple[list[tuple[str, float]], list[str]]:
        out = await asyncio.wrap_future(self._rank_call(history, event_types, candidates))
        return self._ranked(candidates, out)

    @functools.cached_property
    def _search_table(self) -> pd.DataFrame:
        """Every item, most popular first, with the lower-cased "id title" a search matches."""
        table = pd.DataFrame({"item_id": list(self.titles), "title": list(self.titles.values())})
        table["count"] = table["item_id"].map(self.counts).fillna(0.0)
        table = table.sort_values(["count", "item_id"], ascending=[False, True], kind="stable")
        table["key"] = (table["item_id"] + " " + table["title"]).str.lower()
        return table.reset_index(drop=True)

    def search(self, query: str, limit: int) -> list[tuple[str, float]]:
        """Items whose id or title contains `query` (case-insensitive), most popular first."""
        table = self._search_table
        found = table[table["key"].str.contains(query.lower(), regex=False)].head(limit)
        return list(zip(found["item_id"], found["count"].astype(float), strict=True))

    @functools.cached_property
    def _sorted_users(self) -> list[str]:
        return sorted(self.histories)

    def users(self, prefix: str, limit: int) -> list[str]:
        """Stored user ids starting with `prefix`, sorted."""
        users = self._sorted_users
        start = bisect.bisect_left(users, prefix)
        out = []
        for user in users[start:start + limit]:
            if not user.startswith(prefix):
                break
            out.append(user)
        return out

    def similar(self, item_id: str, k: int, flt=None) -> list[tuple[str, float]] | None:
        """Nearest items by cosine of the scored item vectors (exported and live), the item
        itself, withdrawn items and those `flt` refuses excluded; None if the item has no
        vector here (unknown or withdrawn). With the content term those are [v ; g c ; b]
        (towers/item_tower.py), so text likeness counts here as in retrieval."""
        snap = self.view.snapshot if self.view is not None else None
        live_row = snap.row.get(item_id) if snap is not None else None
        row = self.embedding_row.get(item_id)
        if live_row is not None:
            query = snap.unit[live_row]
        elif row is None or (snap is not None and snap.blocked[row]):
            return None
        else:
            query = self.item_matrix[row] * self.inv_norms[row]
        sims = (self.item_matrix @ query) * self.inv_norms  # [items]
        if row is not None:
            sims[row] = -np.inf
        if snap is not None and snap.active:
            sims[snap.blocked] = -np.inf
        if flt:
            sims[~self.filter_mask(flt)] = -np.inf
        n = min(k, int(np.isfinite(sims).sum()))
        found = []
        if n > 0:
            top = np.argpartition(-sims, n - 1)[:n]
            top = top[np.argsort(-sims[top], kind="stable")]
            found = [(str(self.embedding_ids[i]), float(sims[i])) for i in top]
        if snap is not None and snap.n:
            fresh = snap.unit[:snap.n] @ query
            fresh[~snap.fresh_mask(flt)] = -np.inf
            if live_row is not None:
                fresh[live_row] = -np.inf
            n = min(k, snap.n)
            top = np.argpartition(-fresh, n - 1)[:n] if n < snap.n else np.arange(snap.n)
            found += [(str(snap.ids[r]), float(fresh[r])) for r in top if np.isfinite(fresh[r])]
            found = sorted(found, key=lambda pair: -pair[1])[:k]
        return found


def _settle_memory() -> None:
    """Collect garbage (a replaced model once its requests are done), then freeze what is left,
    TensorFlow and the new model included, out of later collections: full collections over those
    ~400k objects paused every request for up to ~200 ms and made the p99 latency
    (bench/bench_api.py, tiny model, 8 connections: p99 93 ms -> 25 ms). A replaced model still
    serving a request here is reclaimed at the next swap, so at most one old model lingers."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass
class ReloadResult:
    model_version: int | None
    changed: bool
    failed: dict[int, str]
    loaded: list[int] = field(default_factory=list)


class ModelStore:
    """The loaded versions under model_dir and the one answering by default.

    Under `latest` the `policy.keep` newest loadable versions stay loaded and the newest of them
    answers by default (never an older one by itself: a withdrawn version keeps serving from
    memory); a pinned policy loads and answers with that version. `extra` versions (those an
    A/B split names) are loaded besides. Any loaded version answers `?version=N`.
    """

    def __init__(self, model_dir: Path, index: str = "scann", poll_seconds: float = 10.0,
                 policy: VersionPolicy = VersionPolicy(), metrics=None,
                 extra: tuple[int, ...] = (), live=None):
        import_index_ops(index)
        from serving.live import LiveState

        self.live = live if live is not None else LiveState(None)
        self.model_dir, self.index, self.poll_seconds = Path(model_dir), index, poll_seconds
        self.policy, self.metrics, self.extra = policy, metrics, tuple(sorted(set(extra)))
        self._current: ServingModel | None = None
        self._loaded: dict[int, ServingModel] = {}  # replaced whole, never mutated
        self._failed: dict[int, tuple[int, str]] = {}  # version -> (dir mtime, reason)
        self._warned_names: set[str] = set()
        self._warned_missing: set[int] = set()  # versions already reported missing
        # Every load runs on this one thread; _inflight is the load running now, if any.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._inflight: Future | None = None
        self._inflight_lock = threading.Lock()
        self._batcher = Batcher()  # every model call of every version goes through it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServingModel | None:
        """Read once per request: the object stays valid even if a swap happens meanwhile."""
        return self._current

    def get(self, version: int) -> ServingModel | None:
        """A loaded version, or None."""
        return self._loaded.get(version)

    @property
    def loaded_versions(self) -> list[int]:
        return sorted(self._loaded, reverse=True)

    @property
    def loading(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    @property
    def failed(self) -> dict[int, str]:
        """Refused versions with a reason fit to show a client (no server paths)."""
        return {version: self.public(reason) for version, (_, reason) in self._failed.items()}

    def public(self, text: str) -> str:
        """`text` with the server's MODEL_DIR paths replaced by the word MODEL_DIR."""
        for path in sorted({str(self.model_dir.resolve()), str(self.model_dir)}, key=len,
                           reverse=True):
            if path not in ("", "."):
                text = text.replace(path, "MODEL_DIR")
        return text

    def reload(self, trigger: str = "admin") -> Future:
        """Start a scan-and-load on the loader thread unless one is running; callers meanwhile
        get the running one's future (single flight). Returns a Future of ReloadResult."""
        with self._inflight_lock:
            if self._inflight is None or self._inflight.done():
                if self.metrics is not None:
                    self.metrics.reloads.labels(trigger).inc()
                self._inflight = self._loader.submit(self._refresh)
            return self._inflight

    def refresh(self, trigger: str = "admin") -> ReloadResult:
        """reload() and wait for its result."""
        return self.reload(trigger).result()

    def _warn_missing(self, version: int, message: str, *args) -> None:
        if version not in self._warned_missing:
            self._warned_missing.add(version)
            log.warning(message, *args)

    def _load(self, version: int, path: Path | None) -> ServingModel | None:
        """The loaded version, or a new load of it; None when it is gone or refused (a failed
        version is not retried until its directory is replaced)."""
        if version in self._loaded:
            return self._loaded[version]
        try:
            stamp = path.stat().st_mtime_ns
        except (OSError, AttributeError):
            return None  # removed while we looked
        if self._failed.get(version, (None,))[0] == stamp:
            return None
        started = time.time()
        try:
            model = ServingModel.load(path, version, self.index, self._batcher)
            self._attach_live(model)
        except Exception as error:  # any broken file: refuse it, keep serving
            reason = f"{type(error).__name__}: {error}"[:500]
            self._failed[version] = (stamp, reason)
            self._count_load("failed", started)
            current = self._current
            log.error("refusing model version %d at %s: %s; still serving %s", version, path,
                      reason, current.version if current else "nothing")
            return None
        self._count_load("loaded", started)
        return model

    def _attach_live(self, model: ServingModel) -> None:
        """The live items and withdrawals, placed by this version's own item tower."""
        from serving.live import LiveRetrieval

        model.live_state = self.live
        model.view = self.live.attach(model)
        model.live = LiveRetrieval(model, model.view)

    def _select(self, present: dict[int, Path]) -> dict[int, ServingModel]:
        """Load what the policy and the split want; the versions to keep loaded."""
        keep: dict[int, ServingModel] = {}
        wanted = set(self.extra)
        if self.policy.pinned is not None:
            wanted.add(self.policy.pinned)
            if self.policy.pinned not in present and self.policy.pinned not in self._loaded:
                self._warn_missing(-self.policy.pinned, "pinned model version %d "
                                   "(MODEL_VERSION) is not in MODEL_DIR", self.policy.pinned)
        else:
            newest_first = sorted(set(present) | set(self._loaded), reverse=True)
            for version in newest_first:
                if len(keep) == self.policy.keep:
                    break
                model = self._load(version, present.get(version))
                if model is not None:
                    keep[version] = model
        for version in sorted(wanted - set(keep), reverse=True):
            model = self._load(version, present.get(version))
            if model is not None:
                keep[version] = model
            elif version not in present:
                self._warn_missing(version, "model version %d (named by the policy or "
                                   "AB_SPLIT) is not in MODEL_DIR", version)
        return keep

    def _refresh(self) -> ReloadResult:
        """Load and warm what the policy wants, here on the loader thread, then swap."""
        before, before_loaded = self._current, self._loaded
        present = dict(list_versions(self.model_dir, self._warned_names))
        for version in before_loaded:
            if version not in present:
                self._warn_missing(version, "served model version %d is gone from MODEL_DIR; "
                                   "still serving it from memory (policy %s)", version,
                                   self.policy)
        loaded = self._select(present)
        if self.policy.pinned is not None:
            current = loaded.get(self.policy.pinned)
        else:
            current = loaded[max(loaded)] if loaded else None
        if current is None and before is not None:  # never from something to nothing
            current = before
            loaded[before.version] = before
        self._loaded, self._current = loaded, current  # the swap: two reference assignments
        changed = current is not before
        if changed:
            newest = max(present, default=current.version)
            if self.policy.pinned is not None and current.version < newest:
                log.warning("serving pinned model version %d by policy (MODEL_VERSION=%d); "
                            "newest is %d", current.version, current.version, newest)
            log.info("now serving model version %d (was %s); loaded: %s", current.version,
                     before.version if before else "none", self.loaded_versions)
            if self.metrics is not None:
                self.metrics.model_version.set(current.version)
        dropped = set(before_loaded) - set(loaded)
        if dropped:
            log.info("unloaded model version(s) %s", sorted(dropped))
        if loaded and (changed or dropped):  # events all loaded versions were trained on
            self.live.prune(min(int(m.metadata.get("events_through") or 0)
                                for m in loaded.values()))
        del before, before_loaded  # let the collection below free replaced models
        if changed or dropped:
            _settle_memory()
        return ReloadResult(current.version if current else None, changed, self.failed,
                            self.loaded_versions)

    def _count_load(self, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.loads.labels(outcome).inc()
            self.metrics.load_seconds.observe(time.time() - started)

    def start(self) -> None:
        """Load a version now (waiting for it), then poll for others in a daemon thread."""
        result = self.refresh("startup")
        if result.model_version is None:
            log.error("no loadable model version under %s yet (policy %s); /ready answers 503",
                      self.model_dir, self.policy)
        if self.poll_seconds > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self._batcher.stop()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh("poll")
            except Exception:  # the poller must outlive any one bad scan
                log.exception("polling %s for new model versions failed", self.model_dir)
