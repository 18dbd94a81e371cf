"""Process-wide TensorFlow settings, imported before TensorFlow by every entry point and the tests.

tensorflow-recommenders needs Keras 2 (tf-keras); TensorFlow picks its Keras at first import,
so this must run before any `import tensorflow`.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
_NATIVE_LOG_LEVEL_SET_BY_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def library_noise(verbose: bool) -> None:
    """What command lines show of TensorFlow's C++ log and transformers' warnings: nothing but
    fatal errors by default (a CPU machine's cuInit error line, weight-loading notes), all of
    it when verbose. Settings the user exported are kept. Call before TensorFlow loads."""
    if not _NATIVE_LOG_LEVEL_SET_BY_USER:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
