"""Prepare a data set for towerrec: `python prepare_data.py --source SOURCE ... --out DIR`.

See `python prepare_data.py --help` and recdata/cli.py.
"""

import sys

from recdata.cli import main

if __name__ == "__main__":
    sys.exit(main())
