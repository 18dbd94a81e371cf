"""TrainConfig: every training hyper-parameter in one dataclass, loadable from YAML and
overridable by command-line flags; saved beside every run."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


def setting(default, help: str, choices: tuple[str, ...] | None = None):
    """A TrainConfig field with its flag's help text and, for a choice, the values it takes:
    the one place a setting is described (train.py --help, validate())."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # towers
    user_tower: str = setting("sasrec", "user tower: SASRec (Kang & McAuley 2018) or GRU4Rec "
                              "(Hidasi et al. 2016)", ("sasrec", "gru"))
    text_model: str = setting("distilbert-base-uncased", "text encoder of the item tower: a "
                              "Hugging Face name or local path, 'minilm' (the packaged "
                              "all-MiniLM-L6-v2) or 'none' (id + metadata only)")
    text_fallback: bool = setting(False, "use the packaged MiniLM when --text-model cannot be "
                                  "loaded (offline machine); the run records which it used")
    text_mode: str = setting("frozen", "frozen: texts embedded once and cached; finetune: the "
                             "encoder runs in the graph and its top blocks train",
                             ("frozen", "finetune"))
    text_pooling: str = setting("mean", "pooling of the encoder's token vectors",
                                ("mean", "cls"))
    text_max_length: int = setting(64, "tokens per item text")
    text_batch_size: int = setting(64, "texts per encoder batch when embedding the catalog")
    finetune_layers: int = setting(2, "top transformer blocks trained with --text-mode "
                                   "finetune")
    cache_dir: str = setting("cache/text", "cache of frozen text embeddings (keyed by model, "
                             "length, pooling and text)")
    use_metadata: bool = setting(True, "category / brand / price-bucket embeddings in the item "
                                 "tower")
    id_dropout: str = setting("auto", "share of items per step trained without their id "
                              "embedding (DropoutNet), or auto: 0.3 when at least 1%% of the "
                              "catalog has no training interaction, else 0")
    id_init: str = setting("random", "initial item-id table: random, or text (PCA of the text "
                           "vectors)", ("random", "text"))
    text_experts: int = setting(0, "0: one Dense text projection; n: n whitening experts, "
                                "gated")
    content_term: str = setting("auto", "beta * g * cosine(newest history item's text, item's "
                                "text) + b inside the score; auto: on when at least 1%% of the "
                                "catalog was never trained on (needs frozen text)",
                                ("auto", "on", "off"))
    content_beta: float = setting(2.0, "the content term's beta at initialisation (then "
                                  "learned)")
    id_max_norm: float = setting(0.0, "> 0: every id embedding row clipped to this norm (a "
                                 "warm item = its text + metadata vector plus a bounded "
                                 "offset, Let It Go, RecSys 2025); 0 = unbounded")
    price_buckets: int = setting(10, "price quantile buckets embedded by the item tower")
    dim: int = setting(64, "vector width of both towers")
    max_seq_len: int = setting(50, "newest history items the user tower reads")
    num_blocks: int = setting(2, "SASRec self-attention blocks")
    num_heads: int = setting(1, "SASRec attention heads (must divide --dim)")
    dropout: str = setting("auto", "user tower dropout, or auto: 0.5 when users have fewer "
                           "than 50 training events on average, else 0.2")
    gru_layers: int = setting(1, "stacked GRU layers in GRU4Rec")
    sasrec_layout: str = setting("sasrec", "block layout: the SASRec authors' code, or "
                                 "pre-LayerNorm", ("sasrec", "pre_ln"))
    user_projection: bool = setting(False, "a Dense layer on the user tower's output "
                                    "(measured: costs NDCG)")
    # tasks
    negatives: str = setting("auto", "retrieval softmax: full catalog or sampled; auto: "
                             "sampled above --full-softmax-max-items, with finetune, or on a "
                             "CPU where the sampled pool would hold <= 50%% of the catalog",
                             ("auto", "full", "sampled"))
    full_softmax_max_items: int = setting(50_000, "negatives auto: never the full softmax "
                                          "above this many items")
    num_negatives: int = setting(1024, "uniform negatives added to the batch's targets "
                                 "(sampled softmax)")
    logq_correction: bool = setting(True, "log-Q correction of the sampled softmax (Yi et al. "
                                    "2019)")
    unseen_negatives: bool = setting(False, "also use never-trained items as negatives")
    retrieval_weight: float = setting(1.0, "weight of the retrieval loss")
    ranking_weight: float = setting(0.1, "weight of the ranking loss (0 = no ranking task)")
    ranking_target: str = setting("auto", "ranking label: rating, purchase, or auto (rating "
                                  "where the data has ratings)",
                                  ("auto", "rating", "purchase", "none"))
    # optimisation
    epochs: int = setting(200, "most epochs (early stopping usually ends sooner)")
    batch_size: int = setting(128, "training windows per batch")
    train_windows: str = setting("all", "all: every train event a target once per epoch; "
                                 "last: each user's newest window only", ("all", "last"))
    bucket_batches: int = setting(32, "sort windows by length within groups of this many "
                                  "batches (0 = off)")
    optimizer: str = setting("auto", "auto: lazy_adam with the sampled softmax, else adam",
                             ("auto", "adam", "lazy_adam"))
    lr: float = setting(1e-3, "the optimizer's learning rate")
    adam_beta2: float = setting(0.98, "Adam's beta2 (0.98 as SASRec's authors train)")
    patience: int = setting(10, "epochs without a valid NDCG@10 gain before stopping")
    time_budget_minutes: float = setting(0.0, "stop after this many minutes of training "
                                         "(0 = no budget)")
    seed: int = setting(42, "seed of everything random (TF op determinism is on)")
    mixed_precision: str = setting("auto", "auto: bfloat16 on GPUs >= 8.0, float16 on older "
                                   "GPUs, float32 on CPUs; on: 16-bit compute, refused without "
                                   "it in hardware; bfloat16 / float16: forced",
                                   ("auto", "on", "off", "bfloat16", "float16"))
    distribute: str = setting("auto", "strategy: auto (mirrored with > 1 GPU); multiworker "
                              "and parameter_server read the cluster from TF_CONFIG",
                              ("auto", "mirrored", "multiworker", "parameter_server", "none"))
    ps_shards: int = setting(0, "parameter_server: shards of each item table (0 = one per ps "
                             "task)")
    # evaluation
    valid_users: str = setting("auto", "users validated after an epoch: auto (all while "
                               "users x items <= 1e8, else a fixed seeded subset), 0 = all, "
                               "or n")
    valid_every: str = setting("auto", "validate every n epochs, or auto: every epoch while "
                               "it takes < 5 s, else as often as keeps it near 20%% of the "
                               "time")
    test_users: int = setting(0, "0 = all users (the protocol); n = a fixed random subset, "
                              "reported")
    eval_batch_size: int = setting(512, "users per evaluation batch")
    sampled_negatives: int = setting(100, "negatives of the sampled_* metrics (reported "
                                     "beside the full-catalog ones)")
    cold_items: float = setting(0.0, "share of items held out of training entirely (a "
                                "cold-start test)")
    # export
    export: bool = setting(True, "export after training")
    export_k: int = setting(100, "items each exported retrieval SavedModel returns")
    scann_num_leaves: int = setting(0, "ScaNN tree leaves (0 = chosen from the catalog size)")
    scann_leaves_to_search: int = setting(0, "ScaNN leaves searched (0 = tuned at export)")
    scann_reorder: int = setting(0, "ScaNN candidates re-scored exactly (0 = tuned at export)")

    def validate(self) -> None:
        for spec in fields(self):
            allowed = spec.metadata["choices"]
            if allowed and getattr(self, spec.name) not in allowed:
                raise ValueError(f"config {spec.name}={getattr(self, spec.name)!r}: expected "
                                 f"one of {', '.join(allowed)}")
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


def _flag_type(spec: dataclasses.Field):
    default = spec.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    return type(default)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores); defaults None = not given."""
    for spec in fields(TrainConfig):
        choices = spec.metadata["choices"]
        kind = _flag_type(spec)
        metavar = ("{" + ",".join(choices) + "}" if choices
                   else "BOOL" if isinstance(spec.default, bool) else None)
        parser.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, type=kind,
                            default=None, metavar=metavar,
                            help=f"{spec.metadata['help']} (default: {spec.default})")


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`, e.g. a resumed run's settings), then the --config YAML file, then
    explicit flags, in that order."""
    config = (TrainConfig.from_yaml(args.config) if getattr(args, "config", None)
              else base or TrainConfig())
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return config
