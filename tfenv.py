"""Process-wide TensorFlow settings, imported before TensorFlow by every entry point and the tests.

tensorflow-recommenders needs Keras 2 (tf-keras); TensorFlow picks its Keras at first import,
so this must run before any `import tensorflow`.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
