"""``ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/demo.yaml``.

Runs every stage of the config in order, skipping stages whose outputs are complete
(``rayscreen run CONFIG``: the same parser and code path). ``--stages train,infer``
runs a subset; ``--force`` reruns complete stages.
"""

import sys

from rayscreen.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
