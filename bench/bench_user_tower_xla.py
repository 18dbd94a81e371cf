"""The user tower's serving cost with and without XLA: the query vector of a full-length history
(SASRec over `max_seq_len` items), per call, at batch sizes 1, 8 and 64, as a plain tf.function
and with `jit_compile=True`, on a trained run's model.

    .venv/bin/python bench/bench_user_tower_xla.py --run RUN_DIR

Prints milliseconds per call, the speed-up and the largest difference between the two outputs.
(Stock TF Serving only runs jit-compiled functions on a CPU when started with
`--xla_cpu_compilation_enabled`; see docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfenv  # noqa: E402,F401  (must precede TensorFlow)

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from towers.model import TwoTowerModel  # noqa: E402


def per_call_ms(function, history, events, calls: int) -> tuple[float, np.ndarray]:
    out = function(history, events)
    out = function(history, events)  # traced and compiled before timing
    start = time.perf_counter()
    for _ in range(calls):
        out = function(history, events)
    values = out.numpy()
    return (time.perf_counter() - start) / calls * 1000, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    model, spec = TwoTowerModel.from_run(args.run)
    items = tf.cast(model.all_item_vectors(), tf.float32)
    rng = np.random.default_rng(0)
    print(f"{args.run}: {spec.user_tower}, length {spec.max_seq_len}, dim {spec.dim}, "
          f"{spec.num_items:,} items")

    def query(history, events):
        return model.user_vector(history, items, events)

    plain, xla = tf.function(query), tf.function(query, jit_compile=True)
    for batch in (1, 8, 64):
        history = tf.constant(rng.integers(1, spec.num_items + 1, (batch, spec.max_seq_len)),
                              tf.int32)
        events = tf.ones_like(history) if spec.num_event_types else None
        plain_ms, plain_out = per_call_ms(plain, history, events, args.calls)
        xla_ms, xla_out = per_call_ms(xla, history, events, args.calls)
        print(f"batch {batch:>2}: plain {plain_ms:.3f} ms, XLA {xla_ms:.3f} ms "
              f"({plain_ms / xla_ms:.2f}x), largest difference "
              f"{np.abs(plain_out - xla_out).max():.1e}", flush=True)


if __name__ == "__main__":
    main()
