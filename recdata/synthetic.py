"""A seeded synthetic data set with structure a sequential recommender can learn.

Items fall into clusters (topics), each with its own words, brands, category and price level, so
item text correlates with behaviour. Users have a few favourite clusters. A sequence is a chain of
runs: a run starts at an anchor item (from a favourite cluster, sometimes a random one) and goes
on with fixed successors (A is often followed by B) or other items of the same cluster.
Popularity is long-tailed: Zipf over clusters, a power law within each cluster. Sequence lengths
are log-normal. Everything is vectorised numpy (10M events in seconds); the only Python loop is
over successor-chain depth, which is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recdata.schema import RawData, make_events

EVENT_TYPES = ("view", "cart", "purchase")


@dataclass(frozen=True)
class SyntheticConfig:
    """The generator's knobs; the defaults give a clearly learnable, long-tailed data set."""

    items_per_cluster: int = 50
    clusters_per_category: int = 10
    words_per_cluster: int = 8
    general_words: int = 200
    items_per_brand: int = 100
    interests_per_user: int = 3
    p_anchor: float = 0.3  # a new run starts
    p_successor: float = 0.45  # the previous item's fixed successor; else same-cluster item
    p_explore: float = 0.15  # an anchor from a random (popularity-weighted) cluster
    cluster_zipf: float = 0.9  # cluster popularity ~ 1 / rank**cluster_zipf
    within_cluster_skew: float = 2.5  # rank = floor(size * u**skew): power-law within cluster
    length_sigma: float = 1.0  # log-normal spread of sequence lengths
    min_length: int = 3
    event_probs: tuple[float, float, float] = (0.75, 0.15, 0.10)  # view, cart, purchase
    start_time: int = 1_600_000_000
    span_seconds: int = 365 * 86_400
    session_gap_seconds: float = 2 * 86_400  # mean gap before an anchor
    click_gap_seconds: float = 180.0  # mean gap inside a run


_SYLLABLES = np.array(
    "ka lo mi ne ru ta vo zi be do fa gu po sa te xi ra ly mo nu pe qua si tor vin wex yal zor "
    "bri cle".split()
)


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct pronounceable pseudo-words."""
    base = len(_SYLLABLES)
    length = 2
    while base**length < 4 * n:
        length += 1
    codes = rng.choice(base**length, size=n, replace=False)
    words = np.full(n, "", dtype=f"<U{4 * length}")
    for _ in range(length):
        codes, digit = np.divmod(codes, base)
        words = np.strings.add(words, _SYLLABLES[digit])
    return words


def _ids(prefix: str, n: int) -> np.ndarray:
    """prefix + zero-padded numbers: equal widths, so string order is number order."""
    width = len(str(max(n - 1, 0)))
    return np.strings.add(prefix, np.strings.zfill(np.arange(n).astype(str), width))


def _sequence_lengths(
    rng: np.random.Generator, num_users: int, num_events: int, cfg: SyntheticConfig
) -> np.ndarray:
    """Log-normal lengths, each >= min_length (when possible), summing to num_events exactly."""
    base = min(cfg.min_length, num_events // num_users)
    extra_total = num_events - base * num_users
    weights = rng.lognormal(0.0, cfg.length_sigma, num_users)
    weights /= weights.sum()
    extra = np.floor(weights * extra_total).astype(np.int64)
    remainder = extra_total - int(extra.sum())
    extra += np.bincount(rng.choice(num_users, size=remainder, p=weights), minlength=num_users)
    return base + extra


def generate(
    num_users: int,
    num_items: int,
    num_events: int,
    seed: int = 0,
    config: SyntheticConfig = SyntheticConfig(),
) -> RawData:
    """Generate num_events events of num_users users over num_items items, deterministically.

    Events come in log order (by time); repeats of a (user, item) pair occur, as in real logs.
    """
    if num_users < 1 or num_items < 2 or num_events < num_users:
        raise ValueError("need num_users >= 1, num_items >= 2 and num_events >= num_users")
    cfg = config
    rng = np.random.default_rng(seed)

    # Clusters occupy contiguous "slots"; slot s is item perm[s], so ids reveal nothing.
    n_clusters = max(1, num_items // cfg.items_per_cluster)
    sizes = rng.multinomial(num_items - n_clusters, np.full(n_clusters, 1 / n_clusters)) + 1
    starts = np.cumsum(sizes) - sizes
    slot_cluster = np.repeat(np.arange(n_clusters), sizes)
    perm = rng.permutation(num_items)

    cluster_weight = 1.0 / (rng.permutation(n_clusters) + 1.0) ** cfg.cluster_zipf
    cluster_cdf = np.cumsum(cluster_weight / cluster_weight.sum())

    def sample_clusters(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cluster_cdf, rng.random(n)), n_clusters - 1)

    def sample_in_clusters(clusters: np.ndarray) -> np.ndarray:
        ranks = np.floor(sizes[clusters] * rng.random(len(clusters)) ** cfg.within_cluster_skew)
        return starts[clusters] + np.minimum(ranks.astype(np.int64), sizes[clusters] - 1)

    # Fixed successor: the next slot in a random cycle through the item's cluster.
    order = np.lexsort((rng.random(num_items), slot_cluster))
    successor = np.empty(num_items, dtype=np.int64)
    successor[order] = np.roll(order, -1)
    successor[order[starts + sizes - 1]] = order[starts]

    lengths = _sequence_lengths(rng, num_users, num_events, cfg)
    user = np.repeat(np.arange(num_users, dtype=np.int32), lengths)
    user_start = np.cumsum(lengths) - lengths
    position = np.arange(num_events) - user_start[user]

    # Kind of each event: 0 anchor (new run), 1 successor, 2 same cluster as the run.
    u = rng.random(num_events)
    kind = (u >= cfg.p_anchor).astype(np.int8) + (u >= cfg.p_anchor + cfg.p_successor)
    kind[position == 0] = 0
    anchor = kind == 0
    n_anchor = int(anchor.sum())
    interests = sample_clusters(num_users * cfg.interests_per_user).reshape(num_users, -1)
    favourite = interests[user[anchor], rng.integers(cfg.interests_per_user, size=n_anchor)]
    explore = rng.random(n_anchor) < cfg.p_explore
    run_cluster = np.where(explore, sample_clusters(n_anchor), favourite)
    event_cluster = run_cluster[np.cumsum(anchor) - 1]

    slot = np.zeros(num_events, dtype=np.int64)
    is_base = kind != 1
    slot[is_base] = sample_in_clusters(event_cluster[is_base])
    # A successor event is successor^k(last non-successor event of its run), k steps back.
    index = np.arange(num_events)
    base_index = np.maximum.accumulate(np.where(is_base, index, 0))
    follow = np.flatnonzero(~is_base)
    steps = index[follow] - base_index[follow]
    current = slot[base_index[follow]]
    deeper = np.arange(len(follow))
    for step in range(1, int(steps.max(initial=0)) + 1):
        deeper = deeper[steps[deeper] >= step]  # chains still going: shrinks geometrically
        current[deeper] = successor[current[deeper]]
    slot[follow] = current

    # Times: each user starts somewhere in the span; long gaps between runs, short inside.
    mean_gap = np.where(anchor, cfg.session_gap_seconds, cfg.click_gap_seconds)
    gap = (rng.exponential(1.0, num_events) * mean_gap).astype(np.int64)
    gap[position == 0] = 0
    elapsed = np.cumsum(gap)
    first = rng.integers(cfg.start_time, cfg.start_time + cfg.span_seconds, size=num_users)
    timestamp = first[user] + elapsed - elapsed[user_start[user]]

    u = rng.random(num_events)
    p_view, p_cart, _ = cfg.event_probs
    event_code = (u >= p_view).astype(np.int8) + (u >= p_view + p_cart)
    quantity = rng.geometric(0.6, size=num_events).astype(np.float32)
    value = np.where(event_code == 0, np.float32(1.0), quantity)

    log_order = np.argsort(timestamp, kind="stable")
    events = make_events(
        pd.Categorical.from_codes(user[log_order], categories=_ids("u", num_users)),
        pd.Categorical.from_codes(
            perm[slot[log_order]].astype(np.int32), categories=_ids("i", num_items)
        ),
        timestamp[log_order],
        pd.Categorical.from_codes(event_code[log_order], categories=list(EVENT_TYPES)),
        value[log_order],
    )
    items = _items(rng, num_items, n_clusters, slot_cluster, perm, cfg)
    return RawData(events=events, items=items, rows_read=num_events)


def _items(
    rng: np.random.Generator,
    num_items: int,
    n_clusters: int,
    slot_cluster: np.ndarray,
    perm: np.ndarray,
    cfg: SyntheticConfig,
) -> pd.DataFrame:
    """Metadata per item: text from its cluster's words, its cluster's category, brand, price."""
    n_categories = max(1, n_clusters // cfg.clusters_per_category)
    n_brands = max(1, num_items // cfg.items_per_brand)
    vocabulary = _words(
        rng, n_clusters * cfg.words_per_cluster + cfg.general_words + n_brands + n_categories
    )
    cluster_words = vocabulary[: n_clusters * cfg.words_per_cluster].reshape(n_clusters, -1)
    rest = vocabulary[n_clusters * cfg.words_per_cluster :]
    general = rest[: cfg.general_words]
    brand_names = np.strings.capitalize(rest[cfg.general_words : cfg.general_words + n_brands])
    category_names = np.strings.capitalize(rest[cfg.general_words + n_brands :])

    category_of_cluster = rng.integers(n_categories, size=n_clusters)
    brands_of_cluster = rng.integers(n_brands, size=(n_clusters, 3))
    log_price_of_cluster = rng.normal(3.0, 1.0, size=n_clusters)

    c = slot_cluster  # per slot
    brand = brand_names[brands_of_cluster[c, rng.integers(3, size=num_items)]].astype(object)
    category = category_names[category_of_cluster[c]].astype(object)
    # Three distinct words of the cluster's vocabulary per item, then a general word.
    picks = np.argsort(rng.random((num_items, cfg.words_per_cluster)), axis=1)[:, :3]
    words = [cluster_words[c, picks[:, j]].astype(object) for j in range(3)]
    words.append(general[rng.integers(cfg.general_words, size=num_items)].astype(object))
    text = np.array(
        [" ".join(parts) for parts in zip(brand, *words, strict=True)], dtype=object
    ) + (" | " + category)
    price = np.round(np.exp(rng.normal(log_price_of_cluster[c], 0.25)), 2)

    slot_of_item = np.empty(num_items, dtype=np.int64)
    slot_of_item[perm] = np.arange(num_items)
    return pd.DataFrame(
        {
            "item_id": _ids("i", num_items).astype(object),
            "text": text[slot_of_item],
            "category": category[slot_of_item],
            "brand": brand[slot_of_item],
            "price": price[slot_of_item],
        }
    )
