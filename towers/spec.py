"""ModelSpec: every number and choice needed to rebuild the two-tower model, saved as
`model_spec.json` in the run directory (nanoGPT's `model_args`, for this model).

Sizes fixed by the data (catalog, event types, text width, metadata vocabularies) sit beside
the architecture settings copied from the training config, so `towers/` can rebuild a trained
model from the spec and a checkpoint alone.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

# Settings whose measured effect was nil, removed; the commit that still had them.
REMOVED = {"text_skip": "1979ee7", "frequency_gate": "1979ee7"}


@dataclass
class ModelSpec:
    # fixed by the data
    num_items: int  # real items are 1..num_items, 0 is padding
    num_event_types: int  # event-type table size (0 = one kind of event, nothing to embed)
    event_vocab: list  # event type id i + 1 <-> event_vocab[i]
    default_event: int  # event type id assumed for requests that give none (most common)
    text_dim: int  # width of the text vectors (0 = no text)
    text_tokens: int  # > 0: fine-tuned encoder over token ids of this length
    text_source: str  # the text encoder used, as a person names it
    meta_sizes: dict  # category / brand / price_bucket vocabulary sizes
    ranking_mode: str  # rating | purchase | none (decided once, in training)
    retrieval_mode: str  # full | sampled
    purchase_pos_weight: float
    # architecture, from the training config
    user_tower: str
    dim: int
    max_seq_len: int
    num_blocks: int
    num_heads: int
    dropout: float
    gru_layers: int
    sasrec_layout: str
    user_projection: bool
    num_negatives: int
    logq_correction: bool
    retrieval_weight: float
    ranking_weight: float
    text_pooling: str
    finetune_layers: int
    id_dropout: float = 0.0  # share of items whose id embedding is dropped per training step
    text_experts: int = 0  # 0: Dense text projection; n: mixture of n whitening experts
    unseen_negatives: bool = False  # never-trained items as softmax negatives (the old way)
    # score + beta * cosine(newest history item's text, item's text), in the dot product
    content_term: bool = False
    content_beta: float = 2.0  # beta at initialisation (then learned)
    id_max_norm: float = 0.0  # > 0: id embedding rows clipped to this norm (bounded offset)

    @property
    def event_type_of_requests(self) -> str | None:
        """The event type name assumed when a request gives none."""
        return self.event_vocab[self.default_event - 1] if self.default_event else None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        data = json.loads(Path(path).read_text())
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{path}: model spec lacks {', '.join(missing)} (written by an "
                             "older towerrec; train the run again to export it)")
        for name, commit in REMOVED.items():
            if data.get(name):
                raise ValueError(f"{path}: trained with {name}, removed after commit {commit} "
                                 "(it measured no gain); export it with that commit, or train "
                                 "again")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
