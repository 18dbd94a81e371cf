"""TrainConfig: every training hyper-parameter in one dataclass, loadable from YAML and
overridable by command-line flags; saved beside every run."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # towers
    user_tower: str = "sasrec"  # sasrec | gru
    text_model: str = "distilbert-base-uncased"  # hub name, local path, "minilm" or "none"
    text_fallback: bool = False  # if the text model can't be loaded, use the packaged MiniLM
    text_mode: str = "frozen"  # frozen (cached embeddings) | finetune (encoder in the graph)
    text_pooling: str = "mean"  # mean | cls
    text_max_length: int = 64
    text_batch_size: int = 64
    finetune_layers: int = 2  # top transformer blocks trained in finetune mode
    cache_dir: str = "cache/text"
    use_metadata: bool = True  # category / brand / price-bucket embeddings
    # share of items per step trained without their id embedding (DropoutNet), or auto:
    # AUTO_ID_DROPOUT when at least COLD_SHARE_FOR_ID_DROPOUT of the catalog has no training
    # interaction (training/data.py), else 0
    id_dropout: str = "auto"
    id_init: str = "random"  # random | text (id table starts from PCA of the text vectors)
    text_experts: int = 0  # 0: one Dense text projection; n: n whitening experts, gated
    # user vector + a learned projection of the newest item's text (towers/item_tower.py)
    text_skip: bool = False
    # id and text terms of an item vector weighted by gates of its training count
    frequency_gate: bool = False
    # score + beta * g * cosine(text of the newest history item, text of the item) + b, inside
    # the one dot product (towers/item_tower.py ContentWeight): on needs frozen text vectors;
    # auto = on when, in addition, the catalog has items never trained on (training/data.py)
    content_term: str = "auto"  # auto | on | off
    content_beta: float = 2.0  # the content term's beta at initialisation (then learned)
    # > 0: every id embedding row clipped to this norm, so a warm item is its text + metadata
    # vector plus a bounded offset (Let It Go, RecSys 2025); 0 = unbounded
    id_max_norm: float = 0.0
    price_buckets: int = 10
    dim: int = 64
    max_seq_len: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    # or auto: the data's sparsity picks it (training/data.py dropout_rate)
    dropout: str = "auto"
    gru_layers: int = 1
    sasrec_layout: str = "sasrec"  # sasrec | pre_ln (see sequential/sasrec.py)
    user_projection: bool = False  # Dense layer on the encoder output (cost NDCG, README)
    # tasks
    negatives: str = "auto"  # auto | full | sampled
    full_softmax_max_items: int = 50_000  # auto: full softmax up to this catalog size
    num_negatives: int = 1024
    logq_correction: bool = True
    unseen_negatives: bool = False  # also use never-trained (cold) items as negatives
    retrieval_weight: float = 1.0
    ranking_weight: float = 0.1
    ranking_target: str = "auto"  # auto | rating | purchase | none
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    train_windows: str = "all"  # all (every train event a target) | last (one window per user)
    bucket_batches: int = 32  # sort windows by length within groups of this many batches; 0 = off
    optimizer: str = "auto"  # auto (lazy_adam with sampled softmax, else adam) | adam | lazy_adam
    lr: float = 1e-3
    adam_beta2: float = 0.98  # as SASRec's authors train
    patience: int = 10  # epochs without valid NDCG@10 improvement before stopping
    time_budget_minutes: float = 0.0  # 0 = no budget
    seed: int = 42
    # auto (bfloat16 on GPUs >= 8.0, float16 on older ones, float32 on CPUs) | on (refused
    # without 16-bit hardware) | off | bfloat16 | float16 (forced): training/precision.py
    mixed_precision: str = "auto"
    # auto (mirrored with >1 GPU) | mirrored | multiworker | parameter_server | none; the last
    # two read the cluster from TF_CONFIG (training/cluster.py)
    distribute: str = "auto"
    ps_shards: int = 0  # parameter_server: shards of each item table (0 = one per ps task)
    # evaluation
    # users validated after an epoch: auto (all while users x items <= VALID_SCORES, else a
    # fixed seeded subset; training/scoring.py) | 0 = all | n = a fixed random subset of n
    valid_users: str = "auto"
    # validate every n epochs, or auto: as often as keeps validation near VALID_SHARE of the
    # training time (measured as the run goes)
    valid_every: str = "auto"
    test_users: int = 0  # 0 = all users (the protocol); else a fixed random subset, reported
    eval_batch_size: int = 512
    sampled_negatives: int = 100
    cold_items: float = 0.0  # fraction of items held out of training entirely
    # export
    export: bool = True
    export_k: int = 100
    scann_num_leaves: int = 0  # 0 = chosen from catalog size
    scann_leaves_to_search: int = 0
    scann_reorder: int = 0

    def validate(self) -> None:
        choices = {"user_tower": ("sasrec", "gru"), "text_mode": ("frozen", "finetune"),
                   "text_pooling": ("mean", "cls"), "sasrec_layout": ("sasrec", "pre_ln"),
                   "train_windows": ("last", "all"), "negatives": ("auto", "full", "sampled"),
                   "ranking_target": ("auto", "rating", "purchase", "none"),
                   "mixed_precision": ("auto", "on", "off", "bfloat16", "float16"),
                   "optimizer": ("auto", "adam", "lazy_adam"), "id_init": ("random", "text"),
                   "content_term": ("auto", "on", "off"),
                   "distribute": ("auto", "mirrored", "multiworker", "parameter_server",
                                  "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config {name}={getattr(self, name)!r}: expected one of "
                                 f"{', '.join(allowed)}")
        for name in ("dim", "max_seq_len", "epochs", "batch_size", "num_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"config dim={self.dim} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.text_experts < 0:
            raise ValueError(f"config text_experts must be >= 0, got {self.text_experts}")
        for name in ("valid_users", "valid_every"):
            value = str(getattr(self, name))
            if value != "auto" and not (value.isdigit() and
                                        int(value) >= (name == "valid_every")):
                raise ValueError(f"config {name} must be 'auto' or a whole number >= "
                                 f"{int(name == 'valid_every')}, got {value!r}")
        for name in ("dropout", "id_dropout"):
            value = str(getattr(self, name))
            if value == "auto":
                continue
            try:
                share = float(value)
            except ValueError:
                share = -1.0
            if not 0.0 <= share < 1.0:
                raise ValueError(f"config {name} must be 'auto' or a number in [0, 1), got "
                                 f"{value!r}")
        if self.id_init == "text" and (self.text_model == "none" or self.text_mode != "frozen"):
            raise ValueError("config id_init=text needs a frozen text model (text_model not "
                             "'none', text_mode frozen)")
        if self.content_term == "on" and self.text_model == "none":
            raise ValueError("config content_term=on needs item text (text_model is 'none'; "
                             "use content_term off or auto)")
        if self.content_term == "on" and self.text_mode != "frozen":
            raise ValueError("config content_term=on needs text_mode=frozen (with a fine-tuned "
                             "encoder the term would run it over every history item)")
        if self.id_max_norm < 0:
            raise ValueError(f"config id_max_norm must be >= 0, got {self.id_max_norm}")
        if not 0.0 < self.content_beta < 100.0:
            raise ValueError(f"config content_beta must be in (0, 100), got {self.content_beta}")
        if not 0.0 <= self.cold_items < 1.0:
            raise ValueError(f"config cold_items must be in [0, 1), got {self.cold_items}")
        if self.ps_shards < 0:
            raise ValueError(f"config ps_shards must be >= 0, got {self.ps_shards}")
        if self.distribute == "parameter_server" and self.text_mode == "finetune":
            raise ValueError("distribute=parameter_server needs text_mode=frozen (fine-tuning "
                             "the text encoder on parameter servers is not supported)")
        if self.text_mode == "finetune" and self.negatives == "full":
            raise ValueError("text_mode=finetune needs negatives=sampled (full softmax would "
                             "run the text encoder over the whole catalog every step)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path}: invalid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
        return cls(**data)


def _flag_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    return type(default)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores); defaults None = not given."""
    for field in fields(TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name,
                            type=_flag_type(field), default=None,
                            help=f"default: {field.default}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the --config YAML file, then explicit flags, in that order."""
    config = TrainConfig.from_yaml(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return config
