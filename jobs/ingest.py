"""``ray job submit ... -- python jobs/ingest.py LOADDATA.csv OUT_DIR [--platemap P] [--quiet]``.

The same function as ``rayscreen ingest``: the CLI's parser and code path.
"""

import sys

from rayscreen.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
