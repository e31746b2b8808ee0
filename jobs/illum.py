"""``ray job submit ... -- python jobs/illum.py --config C [--quiet]``.

The same function as ``rayscreen illum CONFIG`` (:func:`rayscreen.stream.fit.run_illum`):
per-plate illumination functions and normalisers, stored with the plates.
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path: one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("illum"))
