"""``ray job submit ... -- python jobs/aggregate.py --config C [--set k=v ...] [--quiet]``.

The same function as ``rayscreen aggregate CONFIG`` (rayscreen.analysis.stages.run_aggregate).
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path (``rayscreen aggregate CONFIG``): one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("aggregate"))
