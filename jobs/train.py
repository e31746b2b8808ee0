"""``ray job submit ... -- python jobs/train.py --config C [--set train.epochs=2] [--quiet]``.

The same function as ``rayscreen train CONFIG``: :func:`rayscreen.train.run_train`.
Rerunning with the same ``train.run_name`` resumes that run; a new name starts fresh and,
when it finishes, replaces ``<output>/train/model`` and metrics.csv (one exported model per
output: give a run another output to keep both).
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path (``rayscreen train CONFIG``): one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("train"))
