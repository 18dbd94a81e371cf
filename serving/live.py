"""The catalog and histories as they are now, not as they were at export.

`LiveState` mirrors the database's two logs (recdata/livedb.py) in memory: items put (added
or changed) and withdrawn since the export, and each user's events. Every loaded version gets a
`VersionView` of it: its own item tower's vectors for the items put (a fresh segment, scored
exactly) and which exported rows are withdrawn or replaced. Retrieval (`LiveRetrieval`) merges
the exported index's answer with the fresh segment by score, drops withdrawn, filtered and seen
items and, when too few survive, searches again wider or exactly over the allowed items, so `k`
stays full whenever that many items pass.

Why this design: ScaNN's TF ops inside the SavedModel cannot change, and its pybind searcher
can (upsert/delete) but has no locking, so the exported index stays as it is and is read
concurrently without locks; the items added since are few next to the catalog (a re-export
folds them in), and exact scoring of a few thousand vectors costs less than a ScaNN search.
Writers build new arrays and swap one reference (`Snapshot`), so a request reads one
consistent state and never waits for a writer.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from export import contract as c
from recdata.livedb import Database, DatabaseError, Event, ItemChange, Tail

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often other processes' writes are read from the database
EXACT_MAX = 20_000  # allowed exported items scored exactly instead of searched wider
EMBED_BATCH = 64
RECENT = 50  # item changes GET /live lists
PREFETCH = 64  # live items kept per query of a batch, best first
LIVE_PREFETCH = "_live"  # the key of those in a retrieval answer


@dataclass(frozen=True)
class LiveItem:
    item_id: str
    text: str
    category: str
    brand: str
    price: float | None
    seq: int


@dataclass(frozen=True)
class ItemFilter:
    """Which items may be returned; empty sets impose nothing."""

    include_categories: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    include_brands: frozenset[str] = frozenset()
    exclude_brands: frozenset[str] = frozenset()
    include_items: frozenset[str] = frozenset()
    exclude_items: frozenset[str] = frozenset()

    @classmethod
    def of(cls, **lists: Iterable[str] | None) -> ItemFilter:
        return cls(**{name: frozenset(values or ()) for name, values in lists.items()})

    def __bool__(self) -> bool:
        return any((self.include_categories, self.exclude_categories, self.include_brands,
                    self.exclude_brands, self.include_items, self.exclude_items))


class ItemEmbedder:
    """A version's item tower SavedModel and tokenizer: live items -> scored vectors."""

    def __init__(self, version_dir: Path, metadata: dict):
        import tensorflow as tf

        spec = metadata["item_tower"]
        self.max_length = int(spec.get("text_max_length", 64))
        self.tokenizer = None
        if spec.get("tokenizer"):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(version_dir / spec["tokenizer"]))
        self._root = tf.saved_model.load(str(version_dir / c.ITEM_TOWER))
        self._serve = self._root.signatures[c.SERVING_DEFAULT]
        self._lock = threading.Lock()  # one embedding at a time per version

    def __call__(self, items: list[LiveItem]) -> np.ndarray:
        import tensorflow as tf

        out = []
        with self._lock:
            for start in range(0, len(items), EMBED_BATCH):
                chunk = items[start:start + EMBED_BATCH]
                if self.tokenizer is not None:
                    tokens = self.tokenizer([item.text for item in chunk],
                                            max_length=self.max_length, truncation=True,
                                            padding=True, return_tensors="np")
                    ids, mask = tokens["input_ids"], tokens["attention_mask"]
                else:
                    ids = mask = np.zeros((len(chunk), 1), np.int32)
                result = self._serve(
                    input_ids=tf.constant(ids, tf.int32), attention_mask=tf.constant(mask,
                                                                                     tf.int32),
                    category=tf.constant([item.category for item in chunk]),
                    brand=tf.constant([item.brand for item in chunk]),
                    price=tf.constant([np.nan if item.price is None else item.price
                                       for item in chunk], tf.float64))
                out.append(result[c.ITEM_VECTORS].numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of a version's live view; replaced whole, never changed."""

    blocked: np.ndarray  # [exported] bool: withdrawn, or replaced by a live put
    n: int  # fresh rows 0..n-1 are readable (the buffers may be longer)
    vectors: np.ndarray  # [>= n, dim] fresh items' scored vectors
    unit: np.ndarray  # [>= n, dim] the same, unit length (similar items)
    alive: np.ndarray  # [n] bool: the row is the item's current put
    ids: np.ndarray  # [n] object: item ids
    categories: np.ndarray  # [n] object
    brands: np.ndarray  # [n] object
    row: dict[str, int] = field(default_factory=dict)  # live item id -> its alive row
    blocked_count: int = 0
    dead_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # replaced

    @classmethod
    def empty(cls, exported: int, dim: int) -> Snapshot:
        none = np.zeros(0, object)
        return cls(np.zeros(exported, bool), 0, np.zeros((0, dim), np.float32),
                   np.zeros((0, dim), np.float32), np.zeros(0, bool), none, none, none)

    @property
    def active(self) -> bool:
        return self.n > 0 or self.blocked_count > 0

    @functools.cached_property
    def _rows_of(self) -> dict[str, dict[str, np.ndarray]]:
        """category / brand -> the live rows that have it (built once per state, on the first
        filtered request)."""
        rows = pd.Series(np.arange(self.n))
        return {name: rows.groupby(pd.Series(values[:self.n], dtype=object)).indices
                for name, values in (("category", self.categories), ("brand", self.brands))}

    def fresh_mask(self, flt: ItemFilter | None) -> np.ndarray:
        """Live rows that are current and pass the filter: bool [n]."""
        mask = self.alive.copy()
        if not flt:
            return mask
        if flt.include_items:
            keep = np.zeros(self.n, bool)
            keep[[self.row[i] for i in flt.include_items if i in self.row]] = True
            mask &= keep
        if flt.exclude_items:
            mask[[self.row[i] for i in flt.exclude_items if i in self.row]] = False
        for name, include, exclude in (
                ("category", flt.include_categories, flt.exclude_categories),
                ("brand", flt.include_brands, flt.exclude_brands)):
            groups = self._rows_of[name] if include or exclude else {}
            if include:
                keep = np.zeros(self.n, bool)
                for value in include:
                    keep[groups.get(value, [])] = True
                mask &= keep
            for value in exclude:
                mask[groups.get(value, [])] = False
        return mask


class VersionView:
    """A loaded version's fresh segment and exported-row blocks."""

    def __init__(self, model, embedder: ItemEmbedder | None, dim: int):
        self.model_ref = weakref.ref(model)
        self.embedder, self.dim = embedder, dim
        self.snapshot = Snapshot.empty(len(model.embedding_ids), dim)
        self.failed = ""  # why new items cannot be embedded here, if so

    def apply(self, puts: list[LiveItem], withdrawn: list[str], restored: list[str]) -> None:
        """Puts (embedded here), withdrawals and un-withdrawals (a put after a delete)."""
        model = self.model_ref()
        if model is None:
            return
        snap = self.snapshot
        blocked = snap.blocked.copy()
        alive = snap.alive.copy()
        row = dict(snap.row)
        for item in withdrawn:
            exported = model.embedding_row.get(item)
            if exported is not None:
                blocked[exported] = True
            old = row.pop(item, None)
            if old is not None:
                alive[old] = False
        vectors, unit, n = snap.vectors, snap.unit, snap.n
        ids, categories, brands = list(snap.ids), list(snap.categories), list(snap.brands)
        if puts and self.embedder is None:
            self.failed = self.failed or "this version has no item_tower"
        elif puts:
            new = self.embedder(puts)
            if n + len(puts) > len(vectors):  # grow by doubling: readers keep the old buffer
                capacity = max(64, 2 * (n + len(puts)))
                vectors = _grown(vectors, n, capacity, self.dim)
                unit = _grown(unit, n, capacity, self.dim)
            vectors[n:n + len(puts)] = new
            unit[n:n + len(puts)] = new / np.maximum(
                np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            alive = np.concatenate([alive, np.ones(len(puts), bool)])
            for offset, item in enumerate(puts):
                old = row.get(item.item_id)
                if old is not None:
                    alive[old] = False
                row[item.item_id] = n + offset
                exported = model.embedding_row.get(item.item_id)
                if exported is not None:
                    blocked[exported] = True  # the live vector replaces the exported one
                ids.append(item.item_id)
                categories.append(item.category)
                brands.append(item.brand)
            n += len(puts)
        for item in restored:  # withdrawn, then put again: the put above serves it
            exported = model.embedding_row.get(item)
            if exported is not None and item not in row:
                blocked[exported] = False
        self.snapshot = Snapshot(blocked, n, vectors, unit, alive, np.array(ids, object),
                                 np.array(categories, object), np.array(brands, object), row,
                                 int(blocked.sum()), np.flatnonzero(~alive))


def _grown(buffer: np.ndarray, n: int, capacity: int, dim: int) -> np.ndarray:
    out = np.zeros((capacity, dim), np.float32)
    out[:n] = buffer[:n]
    return out


class LiveState:
    """The database's item changes and events in memory, applied to every attached version."""

    def __init__(self, db: Database | None, poll_seconds: float = POLL_SECONDS):
        self.db, self.poll_seconds = db, poll_seconds
        self.items: dict[str, LiveItem] = {}  # put and not withdrawn since
        self.withdrawn: set[str] = set()
        self.events: dict[str, list[Event]] = {}  # user -> events, oldest first
        self._item_tail, self._event_tail = Tail(), Tail()
        self._lock = threading.RLock()
        self._views: weakref.WeakSet = weakref.WeakSet()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.events_applied = 0
        self.recent: collections.deque = collections.deque(maxlen=RECENT)  # (item, op), newest last

    @property
    def enabled(self) -> bool:
        return self.db is not None

    # ---- versions ----
    def attach(self, model) -> VersionView:
        """Give a newly loaded version its view, with every live item embedded by its own item
        tower (before it serves, on the loader thread)."""
        embedder = None
        if model.metadata.get("item_tower"):
            try:
                embedder = ItemEmbedder(model.path, model.metadata)
            except Exception as error:  # noqa: BLE001  (a broken item tower: serve without)
                log.error("model version %d: item_tower cannot be loaded (%s); new items are "
                          "not placed by this version", model.version, error)
        view = VersionView(model, embedder, model.item_matrix.shape[1])
        if embedder is None:
            view.failed = (model.metadata.get("item_tower_missing")
                           or "this version has no item_tower")
        with self._lock:
            started = time.time()
            view.apply(list(self.items.values()), sorted(self.withdrawn), [])
            self._views.add(view)
            if self.items:
                log.info("model version %d: %d live items embedded in %.1fs", model.version,
                         len(self.items), time.time() - started)
        return view

    # ---- reading the database ----
    def sync(self) -> int:
        """Apply whatever the database has that this process has not seen; returns how many
        rows. Raises DatabaseError when it cannot be read."""
        if self.db is None:
            return 0
        with self._lock:
            after, also = self._item_tail.ask()
            changes = self._item_tail.fresh(self.db.item_changes(after, also))
            after, also = self._event_tail.ask()
            events = self._event_tail.fresh(self.db.events(after, also))
            if changes:
                self._apply_items(changes)
            for event in events:
                self.events.setdefault(event.user_id, []).append(event)
            self.events_applied += len(events)
            return len(changes) + len(events)

    def _apply_items(self, changes: list[ItemChange]) -> None:
        latest: dict[str, ItemChange] = {}
        for change in changes:  # in seq order: the last change of an item wins
            latest.pop(change.item_id, None)
            latest[change.item_id] = change
        puts, withdrawn, restored = [], [], []
        for item_id, change in latest.items():
            self.recent.append((item_id, change.op))
            if change.op == "delete":
                self.items.pop(item_id, None)
                self.withdrawn.add(item_id)
                withdrawn.append(item_id)
            else:
                if item_id in self.withdrawn:
                    self.withdrawn.discard(item_id)
                    restored.append(item_id)
                item = LiveItem(item_id, change.text or "", change.category or "",
                                change.brand or "", change.price, change.seq)
                self.items[item_id] = item
                puts.append(item)
        for view in list(self._views):
            try:
                view.apply(puts, withdrawn, restored)
            except Exception as error:  # noqa: BLE001  (one version's failure is its own)
                view.failed = f"{type(error).__name__}: {error}"
                log.exception("applying %d item changes to a version failed", len(latest))

    def start(self) -> None:
        """Read the database once (waiting), then follow it in a daemon thread."""
        if self.db is None:
            return
        try:
            self.sync()
        except DatabaseError as error:
            self.last_error = str(error)
            log.error("live changes unavailable at start: %s", error)
        if self.poll_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="live-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.db is not None:
            self.db.close()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync()
                self.last_error = ""
            except DatabaseError as error:
                if not self.last_error:
                    log.error("reading live changes failed (retrying): %s", error)
                self.last_error = str(error)
            except Exception:  # noqa: BLE001  (the poller must outlive one bad batch)
                log.exception("applying live changes failed")

    def prune(self, through: int) -> int:
        """Forget the events at or below sequence number `through`: every loaded version was
        trained on them (their exports' `events_through`), so no answer reads them. Returns how
        many were dropped. Keeps memory bounded by what happened since the oldest loaded
        export."""
        dropped = 0
        with self._lock:
            for user in list(self.events):
                events = self.events[user]
                kept = [event for event in events if event.seq > through]
                dropped += len(events) - len(kept)
                if kept:
                    self.events[user] = kept
                else:
                    del self.events[user]
        if dropped:
            log.info("dropped %d events every loaded version was trained on", dropped)
        return dropped

    # ---- what requests read ----
    def user_events(self, user_id: str, after_seq: int = 0) -> list[Event]:
        return [e for e in self.events.get(user_id, ()) if e.seq > after_seq]

    def item(self, item_id: str) -> LiveItem | None:
        return self.items.get(item_id)


class LiveRetrieval:
    """Merge a version's exported top-k with its fresh segment under withdrawals, filters and
    seen items; search wider or exactly when too few survive."""

    def __init__(self, model, view: VersionView):
        self.model, self.view = model, view

    def exported_passes(self, snap: Snapshot, flt: ItemFilter, seen: set[str]):
        """item id -> whether that exported item may be returned (the filter's mask once)."""
        model = self.model
        passing = model.filter_mask(flt) if flt else None

        def ok(item: str) -> bool:
            row = model.embedding_row.get(item)
            if row is None or snap.blocked[row] or item in seen:
                return False
            return passing is None or bool(passing[row])
        return ok

    def allowed_rows(self, snap: Snapshot, flt: ItemFilter, seen: set[str]) -> np.ndarray:
        """Exported rows that may be returned: bool [exported]."""
        model = self.model
        allowed = ~snap.blocked
        if flt:
            allowed &= model.filter_mask(flt)
        for item in seen:
            row = model.embedding_row.get(item)
            if row is not None:
                allowed[row] = False
        return allowed

    def prefetch(self, answers: list[dict]) -> None:
        """The batcher's hook: the best PREFETCH live items for every query of a batch, scored
        in one product [batch, live] (no filter; seen items still in)."""
        snap = self.view.snapshot
        if snap.n == 0 or not answers or c.QUERY not in answers[0]:
            return
        try:
            self._prefetch(snap, answers)
        except Exception:  # noqa: BLE001  (finish() scores them itself then)
            log.exception("scoring live items for a batch failed")

    @staticmethod
    def _prefetch(snap: Snapshot, answers: list[dict]) -> None:
        queries = np.stack([answer[c.QUERY] for answer in answers]).astype(np.float32)
        scores = queries @ snap.vectors[:snap.n].T  # [batch, n]
        if snap.dead_rows.size:
            scores[:, snap.dead_rows] = -np.inf
        m = min(PREFETCH, snap.n)
        top = (np.argpartition(-scores, m - 1, axis=1)[:, :m] if m < snap.n
               else np.broadcast_to(np.arange(snap.n), scores.shape))
        best = np.take_along_axis(scores, top, axis=1)
        for answer, rows, values in zip(answers, top, best):
            answer[LIVE_PREFETCH] = (snap, rows, values)

    def fresh(self, snap: Snapshot, query: np.ndarray, flt: ItemFilter, seen: set[str], k: int,
              prefetched=None) -> list[tuple[str, float]]:
        """The k best live items, scored exactly: from the batch's prefetch when it holds them
        (same state, no filter), else one product over the live vectors."""
        if snap.n == 0:
            return []
        if prefetched is not None and prefetched[0] is snap and not flt:
            _, rows, values = prefetched
            order = np.argsort(-values, kind="stable")
            out = []
            for item, value in zip(snap.ids[rows[order]].tolist(), values[order].tolist()):
                if value == -np.inf:
                    break
                if item not in seen:
                    out.append((item, value))
                    if len(out) == k:
                        return out
            if len(rows) == snap.n:
                return out
        rows = np.flatnonzero(snap.fresh_mask(flt))
        if len(rows) == 0:
            return []
        # A selective filter scores its few rows; otherwise one pass over all is cheaper.
        scores = (snap.vectors[rows] @ query if len(rows) < snap.n // 4
                  else (snap.vectors[:snap.n] @ query)[rows])
        ids = snap.ids[rows]
        return [(item, score) for item, score in _top(ids, scores, k + sum(
            item in snap.row for item in seen)) if item not in seen][:k]

    def exact(self, allowed: np.ndarray, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        rows = np.flatnonzero(allowed)
        if len(rows) == 0:
            return []
        scores = self.model.item_matrix[rows] @ query
        return _top(self.model.embedding_ids[rows], scores, k)

    def finish(self, found: list[tuple[str, float]], query: np.ndarray | None, k: int,
               flt: ItemFilter, seen: set[str], prefetched=None) -> list[tuple[str, float]]:
        """k best of the exported answer `found` (the signature's top metadata-k, seen export
        items already out when asked) and the fresh items."""
        snap = self.view.snapshot
        ok = self.exported_passes(snap, flt, seen)
        exported = []
        for item, score in found:  # best first: the first k that pass
            if ok(item):
                exported.append((item, score))
                if len(exported) == k:
                    break
        truncated = len(found) >= self.model.k  # more exported items may lie beyond
        if len(exported) < k and truncated and query is not None:
            exported = self.wider(snap, query, k, flt, seen, ok)
        fresh = self.fresh(snap, query, flt, seen, k, prefetched) if query is not None else []
        merged = sorted(exported + fresh, key=lambda pair: -pair[1])
        return merged[:k]

    def wider(self, snap: Snapshot, query: np.ndarray, k: int, flt: ItemFilter,
              seen: set[str], ok) -> list[tuple[str, float]]:
        """Too few of the index's answer pass: ask the index for more (fetch grown by the
        share of items that pass), or score the allowed items exactly when they are few."""
        allowed = self.allowed_rows(snap, flt, seen)
        count = int(allowed.sum())
        if count <= EXACT_MAX or self.model.index_search is None:
            return self.exact(allowed, query, k)
        share = count / len(allowed)
        fetch = min(self.model.max_fetch, math.ceil((k + len(seen)) / share * 2))
        while True:
            found = self.model.index_search(query, fetch)
            passing = [(item, score) for item, score in found if ok(item)]
            if len(passing) >= k:
                return passing[:k]
            if fetch >= self.model.max_fetch:
                return self.exact(allowed, query, k)
            fetch = min(self.model.max_fetch, fetch * 4)


def _top(ids, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    n = min(k, len(scores))
    top = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(str(ids[i]), float(scores[i])) for i in top]
