"""Train, evaluate and export the two-tower recommender (see `python train.py --help`)."""

import sys

import tfenv  # noqa: F401  (TF settings before TensorFlow loads)
from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
