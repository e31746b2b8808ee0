"""``ray job submit ... -- python jobs/report.py --config CONFIG [--set KEY=VALUE] [--quiet]``.

Writes ``<output>/report/index.html`` (PNG figures beside it) from whatever the stages
have written: ``rayscreen report CONFIG``, the same parser and code path
(:func:`rayscreen.report.run_report`). A bad config or input exits 2 with its message.
"""

import sys

from rayscreen.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("report"))
