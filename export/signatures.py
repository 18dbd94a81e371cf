"""The exported SavedModels: tf.Module wrappers around the trained towers, with their signatures.

All take raw string item ids. History rows may be left- or right-padded with "" and any length;
unknown ids count as padding. The newest `max_len` known items are kept, left-padded, as in
training. Only `ScannRetrieval` needs a custom op (ScaNN's); the rest use stock TF ops so stock
TF Serving loads them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from export import contract as c
from towers.item_tower import split_content


class ItemLookup(tf.Module):
    """String item id <-> item_idx (0 = padding / unknown), event type string -> id."""

    def __init__(self, item_ids: np.ndarray, event_vocab: list[str]):
        super().__init__()
        keys = tf.constant([str(x) for x in item_ids])
        self.item_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.range(1, len(item_ids) + 1,
                                                               dtype=tf.int32)), 0)
        self.item_ids = tf.constant([""] + [str(x) for x in item_ids])  # idx -> id
        events = event_vocab or ["_"]
        self.event_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(events),
                                                tf.range(1, len(events) + 1, dtype=tf.int32)), 0)

    def items(self, ids: tf.Tensor) -> tf.Tensor:
        return self.item_table.lookup(ids)

    def events(self, kinds: tf.Tensor) -> tf.Tensor:
        return self.event_table.lookup(kinds)


def newest_left_padded(idx: tf.Tensor, extra: tf.Tensor, max_len: int):
    """Keep each row's newest `max_len` non-zero entries of `idx`, left-padded to max_len.

    idx, extra [batch, n] (extra = event ids travelling with the items) -> two [batch, max_len].
    """
    present = idx > 0
    count = tf.reduce_sum(tf.cast(present, tf.int32), axis=1, keepdims=True)  # [batch, 1]
    from_newest = count - tf.cumsum(tf.cast(present, tf.int32), axis=1)  # 0 = newest
    keep = present & (from_newest < max_len)
    where = tf.where(keep)  # [kept, 2] (row, column)
    column = max_len - 1 - tf.gather_nd(from_newest, where)
    target = tf.stack([where[:, 0], tf.cast(column, tf.int64)], axis=1)
    shape = tf.stack([tf.shape(idx, out_type=tf.int64)[0], tf.constant(max_len, tf.int64)])
    items = tf.scatter_nd(target, tf.gather_nd(idx, where), shape)
    events = tf.scatter_nd(target, tf.gather_nd(extra, where), shape)
    return items, events


class _Base(tf.Module):
    def __init__(self, user_tower: tf.keras.layers.Layer, item_vectors: np.ndarray,
                 lookup: ItemLookup, max_len: int, use_events: bool, default_event: int = 0,
                 dim: int | None = None,
                 content: tf.keras.layers.Layer | None = None,
                 log_counts: np.ndarray | None = None):
        super().__init__()
        self.user_tower = user_tower
        # [num_items + 1, score_dim]: with the content term [v_i ; g_i c_i ; b_i] (c_i the unit
        # text vector, towers/item_tower.py), else v_i alone; the user tower reads the first
        # `dim` columns.
        self.item_vectors = tf.constant(item_vectors, tf.float32)
        self.dim = item_vectors.shape[1] if dim is None else dim
        # The user tower's inputs, [num_items + 1, dim]: a narrow copy, so a history gathers
        # dim columns per item, not the scored width.
        self.item_inputs = (self.item_vectors if self.dim == item_vectors.shape[1]
                            else tf.constant(item_vectors[:, :self.dim], tf.float32))
        # The content term's beta (towers/item_tower.py ContentWeight) and its input, each
        # item's log(1 + training count); None: the model has no content term.
        self.content = content
        self.log_counts = (None if content is None
                           else tf.constant(log_counts, tf.float32))  # [num_items + 1]
        self.lookup, self.max_len, self.use_events = lookup, max_len, use_events
        # Event type assumed when a request gives none (or an unknown one): the most common
        # in training, so the user tower sees inputs like those it was trained on.
        self.default_event = default_event

    def user_vectors(self, history: tf.Tensor, event_types: tf.Tensor | None,
                     live: tf.Tensor | None = None):
        """-> (query vectors [batch, score_dim], all history idx [batch, n] for exclusion).

        `live` [batch, n, score_dim]: the scored vector of each history entry the catalog does
        not know (items added while serving, placed by the item tower; zeros elsewhere): such
        an entry counts as an item with that vector, as a never-trained catalog item would."""
        idx = self.lookup.items(history)
        kinds = (self.lookup.events(event_types) if event_types is not None
                 else tf.zeros_like(idx))
        kinds = tf.where(kinds > 0, kinds, tf.fill(tf.shape(kinds), self.default_event))
        catalog = self.item_vectors.shape[0] - 1
        live_rows = None
        with_live = idx
        if live is not None:
            # A live entry becomes the pseudo id catalog + 1 + its flat position, read from
            # live_rows (row 0 of which is a zero row, so no gather is ever out of range).
            width = tf.shape(live)[-1]
            live_rows = tf.concat([tf.zeros([1, width], tf.float32),
                                   tf.reshape(tf.cast(live, tf.float32), [-1, width])], 0)
            flat = tf.reshape(tf.range(tf.size(idx), dtype=idx.dtype), tf.shape(idx))
            has_live = (idx == 0) & tf.reduce_any(tf.not_equal(live, 0.0), axis=-1)
            with_live = tf.where(has_live, catalog + 1 + flat, idx)
        items, kinds = newest_left_padded(with_live, kinds, self.max_len)

        def rows(table, ids, live_columns=None):
            """table[ids], live rows for pseudo ids (their first live_columns columns)."""
            known = tf.gather(table, tf.minimum(ids, catalog))
            if live_rows is None:
                return known
            extra = tf.gather(live_rows if live_columns is None
                              else live_rows[:, :live_columns],
                              tf.maximum(ids - catalog, 0))
            return tf.where((ids > catalog)[..., None], tf.cast(extra, known.dtype), known)

        vectors = rows(self.item_inputs, items, self.dim)  # [batch, max_len, dim]
        encoded = self.user_tower(vectors, items > 0,
                                  event_types=kinds if self.use_events else None,
                                  training=False)
        users = tf.cast(encoded[:, -1], tf.float32)  # [batch, dim]
        if self.content is not None:
            # The content term reads the newest item only (left-padded: the last column).
            real = items > 0
            _, text, _ = split_content(rows(self.item_vectors, items[:, -1]), self.dim)
            counts = tf.gather(self.log_counts, tf.where(items > catalog, 0, items))  # live: 0
            beta = self.content.beta(counts, real)[:, -1]
            query = self.content.query(beta, text, real[:, -1])  # [batch, text_dim + 1]
            users = tf.concat([users, query], axis=1)
        return users, idx


def _exclude(scores: tf.Tensor, ids: tf.Tensor, history_idx: tf.Tensor) -> tf.Tensor:
    """scores/ids [batch, n]: push padding and items in the history to UNFILLED_SCORE."""
    seen = tf.reduce_any(ids[:, :, None] == history_idx[:, None, :], axis=2) | (ids == 0)
    return tf.where(seen, tf.constant(c.UNFILLED_SCORE, scores.dtype), scores)


class BruteForceRetrieval(_Base):
    """Exact top-k over every item vector, stock TF ops only."""

    def __init__(self, *args, k: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k

    def top_k(self, history, event_types, exclude_seen: bool, live=None):
        users, history_idx = self.user_vectors(history, event_types, live)
        scores = tf.matmul(users, self.item_vectors, transpose_b=True)  # [batch, items + 1]
        num = tf.shape(scores)[1]
        mask = tf.one_hot(0, num, on_value=True, off_value=False)[None, :]
        if exclude_seen:
            # Mark history items with a scatter instead of comparing against all items.
            rows = tf.repeat(tf.range(tf.shape(history_idx)[0]), tf.shape(history_idx)[1])
            cols = tf.reshape(history_idx, [-1])
            seen = tf.scatter_nd(tf.stack([rows, cols], axis=1), tf.ones_like(cols),
                                 tf.shape(scores)) > 0
            mask = mask | seen
        scores = tf.where(mask, tf.constant(c.UNFILLED_SCORE, scores.dtype), scores)
        best, idx = tf.math.top_k(scores, k=tf.minimum(self.k, num - 1))
        return {c.ITEM_IDS: tf.gather(self.lookup.item_ids, idx), c.SCORES: best,
                c.QUERY: users}


    def search(self, query, fetch):
        """query vectors [batch, score_dim] -> exact top `fetch` items, nothing excluded."""
        scores = tf.matmul(query, self.item_vectors[1:], transpose_b=True)
        best, idx = tf.math.top_k(scores, k=tf.minimum(fetch, tf.shape(scores)[1]))
        return {c.ITEM_IDS: tf.gather(self.lookup.item_ids, idx + 1), c.SCORES: best}


class ScannRetrieval(_Base):
    """Approximate top-k from a ScaNN index over the item vectors (needs `import scann`)."""

    def __init__(self, *args, k: int, index: tf.keras.layers.Layer, max_fetch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.k, self.index, self.max_fetch = k, index, max_fetch

    def top_k(self, history, event_types, exclude_seen: bool, live=None):
        users, history_idx = self.user_vectors(history, event_types, live)
        fetch = tf.constant(self.k)
        if exclude_seen:
            # Over-fetch by the longest history so k items survive the exclusion.
            known = tf.reduce_sum(tf.cast(history_idx > 0, tf.int32), axis=1)
            fetch = tf.minimum(self.k + tf.reduce_max(known), self.max_fetch)
        scores, ids = self.index(users, k=fetch)  # [batch, fetch]
        scores = tf.cast(scores, tf.float32)
        ids = tf.cast(ids, tf.int32)
        scores = (_exclude(scores, ids, history_idx) if exclude_seen
                  else _exclude(scores, ids, tf.zeros_like(history_idx)))
        best, order = tf.math.top_k(scores, k=tf.minimum(self.k, tf.shape(scores)[1]))
        idx = tf.gather(ids, order, batch_dims=1)
        return {c.ITEM_IDS: tf.gather(self.lookup.item_ids, idx), c.SCORES: best,
                c.QUERY: users}


    def search(self, query, fetch):
        """query vectors [batch, score_dim] -> the index's top `fetch` (at most max_fetch)."""
        scores, ids = self.index(query, k=tf.minimum(fetch, self.max_fetch))
        return {c.ITEM_IDS: tf.gather(self.lookup.item_ids, tf.cast(ids, tf.int32)),
                c.SCORES: tf.cast(scores, tf.float32)}


class Ranker(_Base):
    """Ranking-head scores of candidate items for a history."""

    def __init__(self, *args, ranking_head: tf.keras.layers.Layer, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranking_head = ranking_head

    def score(self, history, event_types, candidates):
        users, _ = self.user_vectors(history, event_types)
        idx = self.lookup.items(candidates)  # [batch, n]
        items = tf.gather(self.item_vectors, idx)  # [batch, n, dim]
        tiled = tf.repeat(users[:, None, :], tf.shape(idx)[1], axis=1)
        scores = tf.cast(self.ranking_head(tiled, items), tf.float32)
        return {c.SCORES: scores, c.KNOWN: idx > 0}


def add_signatures(module: tf.Module, kind: str) -> dict:
    """Attach tf.functions with explicit tf.string signatures; returns the signatures dict."""
    history = tf.TensorSpec([None, None], tf.string, name=c.HISTORY)
    events = tf.TensorSpec([None, None], tf.string, name=c.EVENT_TYPES)
    if kind == c.RANKING:
        candidates = tf.TensorSpec([None, None], tf.string, name=c.CANDIDATES)
        module.serve = tf.function(lambda history, candidates: module.score(
            history, None, candidates), input_signature=[history, candidates])
        module.serve_events = tf.function(
            lambda history, event_types, candidates: module.score(history, event_types,
                                                                  candidates),
            input_signature=[history, events, candidates])
        return {c.ranking_signature(False): module.serve,
                c.ranking_signature(True): module.serve_events}
    module.serve = tf.function(lambda history: module.top_k(history, None, True),
                               input_signature=[history])
    module.serve_events = tf.function(
        lambda history, event_types: module.top_k(history, event_types, True),
        input_signature=[history, events])
    module.serve_all = tf.function(lambda history: module.top_k(history, None, False),
                                   input_signature=[history])
    module.serve_all_events = tf.function(
        lambda history, event_types: module.top_k(history, event_types, False),
        input_signature=[history, events])
    module.serve_search = tf.function(module.search, input_signature=[
        tf.TensorSpec([None, module.item_vectors.shape[1]], tf.float32, name=c.QUERY),
        tf.TensorSpec([], tf.int32, name=c.FETCH)])
    live = tf.TensorSpec([None, None, module.item_vectors.shape[1]], tf.float32,
                         name=c.LIVE_VECTORS)
    module.serve_live = tf.function(
        lambda history, event_types, live_vectors: module.top_k(history, event_types, True,
                                                                live_vectors),
        input_signature=[history, events, live])
    module.serve_live_all = tf.function(
        lambda history, event_types, live_vectors: module.top_k(history, event_types, False,
                                                                live_vectors),
        input_signature=[history, events, live])
    return {c.SEARCH: module.serve_search,
            c.live_signature(True): module.serve_live,
            c.live_signature(False): module.serve_live_all,
            c.retrieval_signature(True, False): module.serve,
            c.retrieval_signature(True, True): module.serve_events,
            c.retrieval_signature(False, False): module.serve_all,
            c.retrieval_signature(False, True): module.serve_all_events}


class ItemTowerModule(tf.Module):
    """New items -> their scored vectors: the item tower's path for an item without an id
    embedding (ItemTower.compose with no id and a training count of 0), the frozen text
    encoder included. Token ids in (the version's `tokenizer/` makes them), so stock TF
    Serving loads it: no tokenizer op in the graph."""

    def __init__(self, item_tower: tf.keras.layers.Layer, vocabularies: dict[str, list],
                 encoder: tf.keras.Model | None = None, pooling: str = "mean"):
        super().__init__()
        self.item_tower, self.encoder, self.pooling = item_tower, encoder, pooling
        self.tables = {}
        for name in ("category", "brand"):
            if name in vocabularies:
                words = vocabularies[name] or ["\0"]  # a table needs one key
                self.tables[name] = tf.lookup.StaticHashTable(
                    tf.lookup.KeyValueTensorInitializer(
                        tf.constant(words), tf.range(1, len(words) + 1, dtype=tf.int32)), 0)
        edges = vocabularies.get("price_bucket")
        self.price_edges = None if edges is None else tf.constant(edges, tf.float64)

    def text_vectors(self, input_ids: tf.Tensor, attention_mask: tf.Tensor) -> tf.Tensor:
        """Unit text vectors [batch, text_dim], as training's frozen table holds them."""
        from towers.text_encoder import pool_hidden_states

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              training=False).last_hidden_state
        pooled = tf.cast(pool_hidden_states(hidden, attention_mask, self.pooling), tf.float32)
        norms = tf.norm(pooled, axis=1, keepdims=True)
        return pooled / tf.maximum(norms, 1e-12)

    def embed(self, input_ids, attention_mask, category, brand, price):
        tower = self.item_tower
        batch = tf.shape(category)[0]
        meta = {name: table.lookup(category if name == "category" else brand)
                for name, table in self.tables.items()}
        if self.price_edges is not None:
            value = price  # float64: a price on a bucket edge falls as in training
            bucket = tf.searchsorted(self.price_edges, value, side="right") + 1
            meta["price_bucket"] = tf.where(tf.math.is_finite(value), tf.cast(bucket, tf.int32),
                                            0)
        text = (self.text_vectors(input_ids, attention_mask) if tower.text_dim
                else tf.zeros([batch, 0], tf.float32))
        log_count = tf.zeros([batch], tf.float32)
        vectors = tower.compose(tf.zeros([batch, tower.dim], tower.compute_dtype),
                                text if tower.text_dim else None, meta, log_count)
        return {c.ITEM_VECTORS: tf.cast(vectors, tf.float32), c.CONTENT_VECTORS: text}

    def signatures(self) -> dict:
        specs = [tf.TensorSpec([None, None], tf.int32, name=c.INPUT_IDS),
                 tf.TensorSpec([None, None], tf.int32, name=c.ATTENTION_MASK),
                 tf.TensorSpec([None], tf.string, name=c.CATEGORY),
                 tf.TensorSpec([None], tf.string, name=c.BRAND),
                 tf.TensorSpec([None], tf.float64, name=c.PRICE)]
        self.serve = tf.function(self.embed, input_signature=specs)
        return {c.SERVING_DEFAULT: self.serve}
