"""The serving contract: the files of an exported VERSION, the SavedModels' signature names,
input and output keys, the score of an unfilled slot and the history cap. Export, the
SavedModel signatures and the API all import these; none spells them out again."""

from __future__ import annotations

# ---- a VERSION directory ----
RETRIEVAL_SCANN = "retrieval"  # user tower + ScaNN index (needs scann's ops)
RETRIEVAL_BRUTEFORCE = "retrieval_bruteforce"  # exact, stock TF ops only
RANKING = "ranking"
# New items -> vectors (token ids, category, brand, price in); none for a fine-tuned run
ITEM_TOWER = "item_tower"
TOKENIZER = "tokenizer"  # the text encoder's Hugging Face tokenizer files, for item_tower
SAVED_MODELS = (RETRIEVAL_BRUTEFORCE, RANKING, RETRIEVAL_SCANN, ITEM_TOWER)
ITEM_EMBEDDINGS = "item_embeddings.parquet"  # item_id, embedding
ITEMS = "items.parquet"  # item_id, item_idx, text, category, brand, price, count, train_count
USER_HISTORIES = "user_histories.parquet"  # user_id, history, event_types
METADATA = "metadata.json"
# load in stock TF Serving (no ScaNN ops)
STOCK_OP_MODELS = (RETRIEVAL_BRUTEFORCE, RANKING, ITEM_TOWER)

# ---- TF Serving (saved_model/NAME/tf_serving/ beside the VERSION dirs) ----
TF_SERVING_DIR = "tf_serving"  # <model>/<VERSION> symlinks + the two configs
TF_SERVING_CONFIG = "models.config"  # STOCK_OP_MODELS only: for stock tensorflow_model_server
TF_SERVING_SCANN_CONFIG = "models_scann.config"  # all SAVED_MODELS: a server with ScaNN's ops
# Inside each SavedModel: PredictionLog records TF Serving replays before serving the model.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"

# ---- signatures ----
SERVING_DEFAULT = "serving_default"  # retrieval: seen items excluded; ranking: no event types
WITH_EVENT_TYPES = "with_event_types"
INCLUDE_SEEN = "include_seen"
INCLUDE_SEEN_WITH_EVENT_TYPES = "include_seen_with_event_types"
RETRIEVAL_SIGNATURES = (SERVING_DEFAULT, WITH_EVENT_TYPES, INCLUDE_SEEN,
                        INCLUDE_SEEN_WITH_EVENT_TYPES)
RANKING_SIGNATURES = (SERVING_DEFAULT, WITH_EVENT_TYPES)

# inputs (tf.string [batch, n]) and outputs
HISTORY, EVENT_TYPES, CANDIDATES = "history", "event_types", "candidates"
ITEM_IDS, SCORES, KNOWN = "item_ids", "scores", "known"
QUERY = "query"  # retrieval: the scored query vectors [batch, score_dim]
# retrieval's `search` signature: query vectors and a count in, the index's top `fetch` out
SEARCH, FETCH = "search", "fetch"
# retrieval with items added while serving in the history: their vectors beside the ids
LIVE_HISTORY, LIVE_HISTORY_INCLUDE_SEEN = "live_history", "live_history_include_seen"
LIVE_VECTORS = "live_vectors"  # float32 [batch, n, score_dim], zeros for catalog items
# item tower: inputs and outputs
INPUT_IDS, ATTENTION_MASK = "input_ids", "attention_mask"
CATEGORY, BRAND, PRICE = "category", "brand", "price"
ITEM_VECTORS, CONTENT_VECTORS = "item_vectors", "content_vectors"

# A retrieval slot that could not be filled (more items excluded than the catalog holds)
# scores this; finite so JSON encoders (TF Serving REST) can print it.
UNFILLED_SCORE = -1e30

# Most history entries a request may carry; the ScaNN model over-fetches k + this many
# candidates so that k remain after excluding seen items.
HISTORY_MAX = 1000


def retrieval_signature(exclude_seen: bool, with_event_types: bool) -> str:
    if exclude_seen:
        return WITH_EVENT_TYPES if with_event_types else SERVING_DEFAULT
    return INCLUDE_SEEN_WITH_EVENT_TYPES if with_event_types else INCLUDE_SEEN


def live_signature(exclude_seen: bool) -> str:
    return LIVE_HISTORY if exclude_seen else LIVE_HISTORY_INCLUDE_SEEN


def ranking_signature(with_event_types: bool) -> str:
    return WITH_EVENT_TYPES if with_event_types else SERVING_DEFAULT


def is_filled(score: float) -> bool:
    """False for the padding score of an unfilled retrieval slot (any float rounding kept)."""
    return score > UNFILLED_SCORE / 10
