"""Train the shared base denoiser over the full noise distribution (Ray Train). Re-run to resume.

python jobs/train_base.py --config configs/train_demo.yaml
ray job submit --working-dir . -- python jobs/train_base.py --config CONFIG num_workers=8 use_gpu=true
"""

import sys

from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.train import TrainConfig, run_training


def main(argv=None) -> int:
    cfg = job_config(TrainConfig, argv, __doc__)

    def body():
        with job_console(f"train-{cfg.name}", cfg.output) as con:
            ensure_ray(cfg.ray_address)
            run_training(cfg, progress=con.say)

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
