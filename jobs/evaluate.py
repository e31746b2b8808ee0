"""``ray job submit ... -- python jobs/evaluate.py --config C [--set k=v ...] [--quiet]``.

The same function as ``rayscreen evaluate CONFIG`` (rayscreen.analysis.stages.run_evaluate).
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path (``rayscreen evaluate CONFIG``): one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
