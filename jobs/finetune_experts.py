"""Split the base model by noise level and fine-tune every expert as its own concurrent Ray Train
run; writes the ensemble manifest that generation loads. Re-run to resume (finished experts skip).

python jobs/finetune_experts.py --config configs/finetune_demo.yaml
ray job submit --working-dir . -- python jobs/finetune_experts.py --config CONFIG base=s3://b/runs/base
"""

import sys

from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.experts import FinetuneConfig, run_finetune


def main(argv=None) -> int:
    cfg = job_config(FinetuneConfig, argv, __doc__)

    def body():
        with job_console("experts", cfg.output) as con:
            ensure_ray(cfg.train.ray_address)
            run_finetune(cfg, progress=con.say)

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
