"""``ray job submit ... -- python jobs/profile.py --config C [--set k=v ...] [--quiet]``.

The same function as ``rayscreen profile CONFIG`` (rayscreen.profile.run_profile).
"""

import sys

from rayscreen.cli import job_main

# the CLI's parser and code path (``rayscreen profile CONFIG``): one way to run a stage
if __name__ == "__main__":
    sys.exit(job_main("profile"))
