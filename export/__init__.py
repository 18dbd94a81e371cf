"""export package: a run directory -> a versioned export (SavedModels, ScaNN index, TF Serving
configs, tables); contract.py names what the serving side reads back."""

import tfenv  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
