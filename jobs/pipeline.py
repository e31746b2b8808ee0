"""``RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/s3-screen.yaml``.

Runs every stage of the config in order, skipping stages whose outputs are complete
(``rayscreen run CONFIG``: the same parser and code path). ``--stages train,infer``
runs a subset; ``--force`` reruns complete stages.

A config submitted as a job needs plates and output every node can reach: ``s3://`` URIs or
absolute paths on a shared filesystem. Relative paths resolve inside the job's copy of the
working directory, which holds no git-ignored files (no ``demo_out/`` plates) and is
deleted with the job.
"""

import sys

from rayscreen.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
