"""Where a training step's time goes: the step traced with TensorFlow's profiler and its ops'
self time summed by model part, plus the float32 / bfloat16 speed of the step's two kinds of
product on this CPU (the full softmax's logits, the attention's batched products).

    .venv/bin/python bench/bench_train_profile.py --data data/bench/ml-1m --max-seq-len 200

The model is the defaults' (text tower with --text-model, metadata, ranking at 0.1, the
softmax `--negatives auto` picks); the batches are the training run's own. Prints positions/s
over --steps untimed-by-the-profiler steps, then the traced steps' share of thread time per
part (retrieval softmax, user tower forward and gradient, ranking head, optimizer, idle), then
the products. The trace is left in --logdir for TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tfenv  # noqa: E402,F401  (must precede TensorFlow)

# isort: split
import tensorflow as tf  # noqa: E402
from bench_train_step import first_batches  # noqa: E402
from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as profiler  # noqa: E402

from towers.model import TwoTowerModel  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import load_training_data, model_spec, retrieval_mode  # noqa: E402
from training.features import install_features  # noqa: E402
from training.optimizers import make_optimizer, resolve_optimizer  # noqa: E402

PARTS = (("gradient_tape/retrieval", "retrieval softmax, gradient"),
         ("retrieval", "retrieval softmax, forward"),
         ("gradient_tape/user_tower", "user tower, gradient"),
         ("user_tower", "user tower, forward"),
         ("gradient_tape/ranking_head", "ranking head, gradient"),
         ("ranking_head", "ranking head, forward"),
         ("gradient_tape/item_tower", "item tower, gradient"),
         ("item_tower", "item tower, forward"))


def part_of(op_name: str) -> str:
    for prefix, part in PARTS:
        if op_name.startswith(prefix + "/"):
            return part
    return "optimizer" if "Adam" in op_name.split("/")[0] else "other"


def op_self_times(logdir: str) -> dict[str, float]:
    """Self time (microseconds) per op name of the trace in `logdir`, IDLE included."""
    traces = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    data, ok = profiler.xspace_to_tools_data(traces, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"could not read the trace in {logdir}")
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    times: dict[str, float] = {}
    for row in table["rows"]:
        record = dict(zip(columns, [cell.get("v") for cell in row["c"]]))
        name = "IDLE" if record["type"] == "IDLE" else record["operation"]
        times[name] = times.get(name, 0.0) + record["total_self_time"]
    return times


def product_ms(shape_a, shape_b, dtype, repeats: int = 10) -> float:
    a = tf.random.normal(shape_a)
    b = tf.random.normal(shape_b)

    @tf.function
    def run():
        return tf.reduce_sum(tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype),
                                               transpose_b=True), tf.float32))
    run()
    began = time.perf_counter()
    for _ in range(repeats):
        total = run()
    float(total)
    return 1000 * (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--text-model", default="minilm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--traced", type=int, default=10)
    parser.add_argument("--logdir", default="/tmp/towerrec-profile")
    args = parser.parse_args()

    config = TrainConfig(text_model=args.text_model, text_fallback=True,
                         max_seq_len=args.max_seq_len)
    data = load_training_data(config, args.data)
    choice = retrieval_mode(config, data, on_gpu=False)
    spec = model_spec(config, data, choice.mode)
    model = TwoTowerModel.from_spec(spec, data.positions_per_batch(config))
    install_features(model, data.features, data.popularity, spec.text_pooling,
                     spec.finetune_layers, config.id_init)
    model.compile(optimizer=make_optimizer(resolve_optimizer("auto", choice.mode), config.lr,
                                           config.adam_beta2))
    warmup = 5
    batches = first_batches(data, config, spec, warmup + args.steps + args.traced)
    step = tf.function(model.train_step, reduce_retracing=True)
    for batch in batches[:warmup]:
        step(batch)
    timed = batches[warmup:warmup + args.steps]
    positions = sum(int(tf.reduce_sum(tf.cast(b["targets"] > 0, tf.int32))) for b in timed)
    began = time.perf_counter()
    for batch in timed:
        loss = step(batch)["loss"]
    float(loss)
    seconds = time.perf_counter() - began
    print(f"{args.data.name}: {spec.num_items:,} items, {choice.mode} softmax ({choice.reason}); "
          f"{positions / seconds:,.0f} positions/s, {1000 * seconds / len(timed):.0f} ms/step "
          f"over {len(timed)} steps")

    shutil.rmtree(args.logdir, ignore_errors=True)
    tf.profiler.experimental.start(args.logdir)
    for batch in batches[warmup + args.steps:]:
        loss = step(batch)["loss"]
    float(loss)
    tf.profiler.experimental.stop()
    times = op_self_times(args.logdir)
    total = sum(times.values())
    parts: dict[str, float] = {}
    for name, micros in times.items():
        part = "idle (a thread waiting)" if name == "IDLE" else part_of(name)
        parts[part] = parts.get(part, 0.0) + micros
    print(f"\n{args.traced} traced steps, thread time by part (trace in {args.logdir}):")
    print("| part | ms per step | share |")
    print("|---|---|---|")
    for part, micros in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {micros / 1000 / args.traced:.1f} | {micros / total:.1%} |")
    print("\nheaviest ops:")
    for name, micros in sorted(times.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {micros / total:6.1%}  {name}")

    positions_per_step = max(positions // max(len(timed), 1), 1)
    print("\nproducts, ms each (float32 / bfloat16):")
    shapes = {f"softmax logits [{positions_per_step} x {spec.dim}] x [{spec.dim} x "
              f"{spec.num_items}]": ([positions_per_step, spec.dim], [spec.num_items, spec.dim]),
              f"attention [128 x {args.max_seq_len} x {spec.dim}] batched":
              ([128, args.max_seq_len, spec.dim], [128, args.max_seq_len, spec.dim])}
    for label, (a, b) in shapes.items():
        f32, bf16 = (product_ms(a, b, dtype) for dtype in (tf.float32, tf.bfloat16))
        print(f"  {label}: {f32:.1f} / {bf16:.1f} ({f32 / bf16:.2f}x)")


if __name__ == "__main__":
    main()
