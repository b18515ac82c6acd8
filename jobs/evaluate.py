"""FID and CLIP score of generated images against a reference set (feature extractors from paths).

python jobs/evaluate.py generated=outputs/generated reference=data/reference \\
    fid_weights=/models/inception_v3.safetensors clip.clip=ViT-L-14 clip.clip_pretrained=/models/vit-l-14.safetensors
"""

import json
import sys

from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.evaluate import EvalConfig, run_evaluate


def main(argv=None) -> int:
    cfg = job_config(EvalConfig, argv, __doc__)

    def body():
        with job_console("evaluate", None) as con:  # its log goes to ./_logs/
            ensure_ray()
            figures = run_evaluate(cfg, progress=con.say)
        print(json.dumps(figures, indent=2))

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
