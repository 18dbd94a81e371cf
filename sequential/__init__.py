"""sequential package."""

import tfenv  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from sequential.gru4rec import GRU4Rec
from sequential.masks import padding_mask_from_ids
from sequential.sasrec import SASRec

__all__ = ["GRU4Rec", "SASRec", "padding_mask_from_ids"]
