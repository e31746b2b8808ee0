"""``ray job submit ... -- python jobs/infer.py --config C.yaml [--set infer.batch_size=32] [--quiet]``.

The same function as ``rayscreen infer``: :func:`rayscreen.infer.run.run_infer`.
Prints the results URI on success; a bad config or input exits 2 with its message.
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path (``rayscreen infer CONFIG``): one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("infer"))
