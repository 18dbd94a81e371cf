"""Full against sampled softmax over catalog sizes: for each prepared data set, what
`--negatives auto` picks and why (the expected sampled pool's share of the catalog), and the
training step's positions/s with either softmax, side by side in one process.

    .venv/bin/python bench/bench_negatives.py --data data/bench/ml-1m:200 data/bench/online-retail
    .venv/bin/python bench/bench_negatives.py --synthetic 3000 10000 30000 100000 --work /tmp/neg

DATA is a prepared data directory, optionally `:LENGTH` (max_seq_len, default 50).
`--synthetic N...` prepares synthetic catalogs of N items (prepare_data.py --source synthetic,
--events-per-user events per user, 3 users per item, at most 100,000 users) under --work
first. SASRec dim 64, the item tower of the defaults minus text (id + metadata), ranking at
its default weight; each softmax with the optimizer `auto` gives it (adam / lazy_adam).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tfenv  # noqa: E402,F401  (must precede TensorFlow)

# isort: split
from bench_train_step import first_batches, time_steps  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.data import load_training_data, model_spec, retrieval_mode  # noqa: E402
from training.optimizers import resolve_optimizer  # noqa: E402


def synthetic(work: Path, items: int, events_per_user: int) -> Path:
    users = min(3 * items, 100_000)
    out = work / f"synth-{items}-{events_per_user}"
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--source", "synthetic",
                        "--num-users", str(users), "--num-items", str(items),
                        "--num-events", str(users * events_per_user), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=[], help="DIR[:LENGTH] ...")
    parser.add_argument("--synthetic", nargs="*", type=int, default=[], help="catalog sizes")
    parser.add_argument("--events-per-user", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-negatives"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()

    sets = []
    for spec in args.data:
        path, _, length = spec.partition(":")
        sets.append((Path(path), int(length or 50)))
    for items in args.synthetic:
        sets.append((synthetic(args.work, items, args.events_per_user), 50))
    if not sets:
        parser.error("give --data and/or --synthetic")

    rows = []
    for path, length in sets:
        config = TrainConfig(text_model="none", max_seq_len=length)
        data = load_training_data(config, path)
        choice = retrieval_mode(config, data, on_gpu=False)
        rates = {}
        for mode in ("full", "sampled"):
            spec = model_spec(config, data, mode)
            batches = first_batches(data, config, spec, args.warmup + args.steps)
            rates[mode], _ = time_steps(data, config, spec, resolve_optimizer("auto", mode),
                                        batches, args.warmup)
        rows.append((path.name, data.seqs.num_items, data.mean_batch_positions(
            config.batch_size), choice, rates))
        print(f"{path.name}: full {rates['full']:,.0f}, sampled {rates['sampled']:,.0f} "
              f"positions/s; auto: {choice.mode} ({choice.reason})", flush=True)

    print(f"\nSASRec dim 64, batch 128, {args.steps} timed steps per softmax")
    print("| data | items | positions/batch | auto picks | why | full pos/s | sampled pos/s "
          "| sampled / full |")
    print("|---|---|---|---|---|---|---|---|")
    for name, items, positions, choice, rates in rows:
        print(f"| {name} | {items:,} | {positions:,.0f} | {choice.mode} | {choice.reason} | "
              f"{rates['full']:,.0f} | {rates['sampled']:,.0f} | "
              f"{rates['sampled'] / rates['full']:.2f}x |")


if __name__ == "__main__":
    main()
