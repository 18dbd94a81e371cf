"""Training-step throughput of the whole two-tower model on a prepared data set, with dense Adam
and with LazyAdam: positions/s over timed steps after a warm-up, and the process's peak RSS.

    .venv/bin/python bench/bench_train_step.py --data data/processed/synth1m
    .venv/bin/python bench/bench_train_step.py --data data/processed/ml1m --negatives full

SASRec user tower, id + metadata item tower (no text), sampled softmax over the batch's targets
plus --num-negatives uniform negatives unless --negatives full; the batches are the training
run's own (length-bucketed windows). Each optimizer gets a freshly built model.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfenv  # noqa: E402,F401  (must precede TensorFlow)

# isort: split
import tensorflow as tf  # noqa: E402

from towers.model import TwoTowerModel  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import load_training_data, model_spec, retrieval_mode  # noqa: E402
from training.features import install_features  # noqa: E402
from training.fit import training_dataset  # noqa: E402
from training.optimizers import make_optimizer  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def first_batches(data, config: TrainConfig, spec, count: int) -> list[dict]:
    """The training run's own first `count` batches (length-bucketed windows)."""
    batches = []
    for batch in training_dataset(data.windows, config.batch_size, config.seed,
                                  spec.num_event_types > 0, config.bucket_batches):
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def time_steps(data, config: TrainConfig, spec, optimizer: str, batches: list[dict],
               warmup: int) -> tuple[float, float]:
    """(positions/s, seconds/step) of a freshly built model's training step over `batches`,
    the first `warmup` untimed."""
    tf.keras.utils.set_random_seed(config.seed)
    model = TwoTowerModel.from_spec(spec, data.positions_per_batch(config))
    install_features(model, data.features, data.popularity, spec.text_pooling,
                     spec.finetune_layers)
    model.compile(optimizer=make_optimizer(optimizer, config.lr, config.adam_beta2))
    step = tf.function(model.train_step, reduce_retracing=True)
    for batch in batches[:warmup]:
        step(batch)
    timed = batches[warmup:]
    positions = sum(int(tf.reduce_sum(tf.cast(b["targets"] > 0, tf.int32))) for b in timed)
    began = time.perf_counter()
    for batch in timed:
        loss = step(batch)["loss"]
    float(loss)  # wait for the last step
    seconds = time.perf_counter() - began
    return positions / seconds, seconds / max(len(timed), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--optimizers", nargs="+", default=["adam", "lazy_adam"])
    parser.add_argument("--negatives", default="sampled", choices=["sampled", "full"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-negatives", type=int, default=1024)
    args = parser.parse_args()

    config = TrainConfig(text_model="none", negatives=args.negatives, dim=args.dim,
                         max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                         num_negatives=args.num_negatives)
    started = time.time()
    data = load_training_data(config, args.data)
    spec = model_spec(config, data, retrieval_mode(config, data, on_gpu=False).mode)
    print(f"{args.data}: {spec.num_items:,} items, {len(data.windows['history']):,} windows, "
          f"{data.positions:,} positions/epoch; loaded in {time.time() - started:.0f}s, "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    batches = first_batches(data, config, spec, args.warmup + args.steps)
    rows = []
    for name in args.optimizers:
        rate, per_step = time_steps(data, config, spec, name, batches, args.warmup)
        rows.append((name, rate, per_step, peak_rss_gb()))
        print(f"{name}: {rate:,.0f} positions/s, {1000 * per_step:.0f} ms/step", flush=True)

    print(f"\n{spec.num_items:,} items, SASRec dim {config.dim}, length {config.max_seq_len}, "
          f"batch {config.batch_size}, {args.negatives} softmax"
          + (f" ({config.num_negatives} negatives + in-batch)" if args.negatives == "sampled"
             else "") + f", {args.steps} timed steps")
    print("| optimizer | positions/s | ms/step | peak RSS GB |")
    print("|---|---|---|---|")
    for name, rate, per_step, rss in rows:
        print(f"| {name} | {rate:,.0f} | {1000 * per_step:.0f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
