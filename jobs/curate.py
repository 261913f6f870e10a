"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/curate.py --config configs/x.yaml`.

Runs `curation curate` on the cluster the job is submitted to (Ray sets RAY_ADDRESS for the driver).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from curation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
