"""ScaNN vs brute-force retrieval: index build time, single-query latency, batched throughput
and recall@10 against exact search, for synthetic catalogs of 100K and 1M items.

    python bench/bench_index.py [--sizes 100000,1000000] [--dims 64,128]

Item vectors are clustered (like trained item embeddings, unlike i.i.d. noise); queries are
drawn near the clusters. The index is built and tuned exactly as `train.py export` does
(export/scann_index.py: the fastest leaves-searched / re-scored pair that reaches recall@10 >=
0.95, found by search-time settings on one tree); "build s" includes the tuning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfenv  # noqa: E402,F401  (TF settings before TensorFlow loads)

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from export.scann_index import ScannIndex, ScannParams, Tuner, tune  # noqa: E402

K = 10


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 2000) -> np.ndarray:
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = centers[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))
    return out.astype(np.float32)


def exact_top_k(items: tf.Tensor, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 256):
        scores = tf.matmul(queries[start:start + 256], items, transpose_b=True)
        out.append(tf.math.top_k(scores, k).indices.numpy())
    return np.concatenate(out)


def median_latency_ms(fn, queries: np.ndarray, repeats: int) -> float:
    fn(queries[:1])  # warm up / trace
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)][None, :]
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def throughput_qps(fn, queries: np.ndarray, batch: int = 64) -> float:
    fn(queries[:batch])
    start = time.perf_counter()
    done = 0
    for s in range(0, len(queries), batch):
        fn(queries[s:s + batch])
        done += len(queries[s:s + batch])
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in map(int, args.sizes.split(",")):
        for dim in map(int, args.dims.split(",")):
            items = clustered(n, dim, rng)
            queries = clustered(args.queries, dim, rng)
            items_tf = tf.constant(items)

            @tf.function(input_signature=[tf.TensorSpec([None, dim], tf.float32)])
            def brute(q, items_tf=items_tf):
                return tf.math.top_k(tf.matmul(q, items_tf, transpose_b=True), K)

            exact = exact_top_k(items_tf, queries, K) + 1  # ScaNN identifiers are 1-based
            padded = np.concatenate([np.zeros((1, dim), np.float32), items])
            start = time.perf_counter()
            index = ScannIndex(padded, K, ScannParams.for_catalog(n, K))
            no_history = [np.zeros(0, np.int32)] * len(queries)
            params, recall, curve = tune(Tuner(index, queries, no_history, exact, K, K),
                                         index.params)
            index.leaves_to_search, index.reorder = params.leaves_to_search, params.reorder
            build = time.perf_counter() - start  # the tree, plus every tuning point measured
            print("  tuning curve (leaves, reorder, recall@10, ms): " + ", ".join(
                f"({e['leaves_to_search']}, {e['reorder']}, {e['recall@10']:.3f}, "
                f"{e['ms_per_query']:.2f})" for e in curve), flush=True)
            # Both searches run as graphs, as they do inside the exported SavedModels.
            scann = tf.function(lambda q, index=index: index(q, K),
                                input_signature=[tf.TensorSpec([None, dim], tf.float32)])
            brute_ms = median_latency_ms(brute, queries, args.repeats)
            scann_ms = median_latency_ms(scann, queries, args.repeats)
            row = (n, dim, build, params, recall, brute_ms, scann_ms,
                   throughput_qps(brute, queries), throughput_qps(scann, queries))
            rows.append(row)
            print(f"{n:,} x {dim}: build {build:.1f}s, recall@10 {recall:.3f}, single query "
                  f"brute {brute_ms:.2f} ms / scann {scann_ms:.2f} ms", flush=True)
            del items, items_tf, index
    print("\n| items | dim | ScaNN build s | leaves / searched / reorder | recall@10 "
          "| 1-query brute ms | 1-query ScaNN ms | speed-up | batch-64 brute q/s "
          "| batch-64 ScaNN q/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, dim, build, p, recall, bms, sms, bq, sq in rows:
        print(f"| {n:,} | {dim} | {build:.1f} | {p.num_leaves} / {p.leaves_to_search} / "
              f"{p.reorder} | {recall:.3f} | {bms:.2f} | {sms:.2f} | {bms / sms:.1f}x "
              f"| {bq:,.0f} | {sq:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
