"""Cost of the content term in one training step's retrieval loss: the full softmax's logits,
cross-entropy and gradients for one batch, without and with the content term
(towers/tasks.py `_logits`), at the shapes of a real run.

    .venv/bin/python bench/bench_content_term.py --positions 6400 --items 3665 --text-dim 384

Random inputs; the figure is milliseconds per loss + gradient (median of --repeats after a
warm-up), which is what the term adds to each step whatever the data.
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

from towers.tasks import NextItemRetrieval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=6400)
    parser.add_argument("--items", type=int, default=3665)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    task = NextItemRetrieval(args.items, mode="full")
    task.build(None)
    task.popularity.assign(np.r_[0.0, np.full(args.items, 1.0 / args.items)].astype(np.float32))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    queries = tf.Variable(rng.normal(size=(args.positions, args.dim)).astype(np.float32))
    items = tf.Variable(rng.normal(size=(args.items + 1, args.dim)).astype(np.float32))
    text = tf.constant(unit(rng.normal(size=(args.positions, args.text_dim))), tf.float32)
    item_text = tf.constant(unit(rng.normal(size=(args.items + 1, args.text_dim))), tf.float32)
    beta = tf.Variable(np.ones(args.positions, np.float32))
    weight = tf.Variable(np.ones(args.items + 1, np.float32))
    bias = tf.Variable(np.zeros(args.items + 1, np.float32))
    targets = tf.constant(rng.integers(1, args.items + 1, args.positions), tf.int32)

    @tf.function
    def step(with_content: bool):
        with tf.GradientTape() as tape:
            if with_content:
                wide = tf.concat([items, weight[:, None] * item_text, bias[:, None]], axis=1)
                loss = task(queries, targets, wide, content=(beta, text))
            else:
                loss = task(queries, targets, items)
        return tape.gradient(loss, [queries, items, beta, weight, bias])

    print(f"positions {args.positions:,}, items {args.items:,}, dim {args.dim}, "
          f"text dim {args.text_dim}")
    base = None
    for with_content in (False, True):
        step(with_content)  # trace + warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step(with_content)
            times.append(time.perf_counter() - started)
        ms = 1000 * float(np.median(times))
        base = base or ms
        print(f"{'with' if with_content else 'without'} content term: {ms:.1f} ms "
              f"({ms / base:.2f}x)")


if __name__ == "__main__":
    main()
