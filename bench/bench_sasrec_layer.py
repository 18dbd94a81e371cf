"""Training throughput of the SASRec layer alone: forward + backward, positions per second.

    .venv/bin/python bench/bench_sasrec_layer.py

Random inputs at dim 64, seq 200, batch 128, 2 blocks, 1 head; a trivial loss; tf.function.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfenv  # noqa: E402,F401  (must precede TensorFlow)

# isort: split
import tensorflow as tf  # noqa: E402

from sequential import SASRec  # noqa: E402

DIM, SEQ, BATCH, BLOCKS, HEADS = 64, 200, 128, 2, 1
WARMUP, STEPS = 3, 20


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    layer = SASRec(DIM, max_len=SEQ, num_blocks=BLOCKS, num_heads=HEADS)
    embeddings = tf.random.normal([BATCH, SEQ, DIM])
    lengths = tf.random.uniform([BATCH, 1], 1, SEQ + 1, dtype=tf.int32)
    padding_mask = tf.range(SEQ)[None, :] >= SEQ - lengths  # left-padded, like training windows

    @tf.function
    def step(embeddings, padding_mask):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(embeddings, padding_mask, training=True)))
        grads = tape.gradient(loss, layer.trainable_variables)
        return loss + tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads]) * 0.0

    for _ in range(WARMUP):
        step(embeddings, padding_mask)
    start = time.perf_counter()
    for _ in range(STEPS):
        result = step(embeddings, padding_mask)
    result.numpy()  # wait for the last step
    seconds = time.perf_counter() - start
    print(
        f"SASRec layer fwd+bwd dim={DIM} seq={SEQ} batch={BATCH} blocks={BLOCKS} heads={HEADS}: "
        f"{BATCH * SEQ * STEPS / seconds:,.0f} positions/s ({seconds / STEPS * 1000:.0f} ms/step)"
    )


if __name__ == "__main__":
    main()
