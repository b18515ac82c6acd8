"""Image-text Parquet shards -> embedding shards (Ray Data). Resumable: re-run to continue.

python jobs/precompute_embeddings.py --config configs/precompute_demo.yaml
ray job submit --working-dir . -- python jobs/precompute_embeddings.py --config CONFIG output=s3://bucket/emb
"""

import json
import sys

from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.precompute import PrecomputeConfig, run_precompute


def main(argv=None) -> int:
    cfg = job_config(PrecomputeConfig, argv, __doc__)

    def body():
        with job_console("precompute", cfg.output) as con:
            ensure_ray(cfg.ray_address)
            totals = run_precompute(cfg, progress=con.say)["totals"]
        print(json.dumps(totals, indent=2))

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
