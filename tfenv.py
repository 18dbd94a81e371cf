"""Process-wide TensorFlow settings, imported before TensorFlow by every entry point and the tests.

tensorflow-recommenders needs Keras 2 (tf-keras); TensorFlow picks its Keras at first import,
so this must run before any `import tensorflow`.

Library log lines (TensorFlow's C++ log, absl's, transformers' warnings) are off by default:
on a CPU-only machine they read like faults (`failed call to cuInit: ... CUDA error`, the
absl::InitializeLog note). `-v` on a command line, or TOWERREC_VERBOSE=1 in the environment
(the server, any script), brings them back; a TF_CPP_MIN_LOG_LEVEL the user exported is kept.
"""

import os

VERBOSE_ENV = "TOWERREC_VERBOSE"

os.environ["TF_USE_LEGACY_KERAS"] = "1"
_NATIVE_LOG_LEVEL_SET_BY_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ
_TRANSFORMERS_LEVEL_SET_BY_USER = "TRANSFORMERS_VERBOSITY" in os.environ
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def library_noise(verbose: bool) -> None:
    """What the process shows of TensorFlow's C++ log and transformers' warnings: nothing but
    fatal errors by default, all of it when verbose (or TOWERREC_VERBOSE=1). Settings the
    user exported are kept. Call before TensorFlow loads."""
    verbose = verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    if not _NATIVE_LOG_LEVEL_SET_BY_USER:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    if not _TRANSFORMERS_LEVEL_SET_BY_USER:
        os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"


library_noise(False)
