"""Generate images for every prompt in a file with Ray Data generator actors; re-run to resume.

python jobs/generate.py --config configs/generate_demo.yaml --prompts prompts.txt --out outputs/generated
ray job submit --working-dir . -- python jobs/generate.py --config CONFIG --prompts s3://b/prompts.jsonl \\
    --out s3://b/images model=s3://b/runs/experts/manifest.json num_gpus=1 concurrency=8
"""

import sys

from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.generate import GenerateConfig, run_generate


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, key in (("--prompts", "prompts"), ("--out", "out"), ("--model", "model")):
        if flag in argv:  # shorthands for the most used settings
            i = argv.index(flag)
            if i + 1 >= len(argv):
                print(f"error: {flag} needs a value", file=sys.stderr)
                return 2
            argv[i : i + 2] = [f"{key}={argv[i + 1]}"]
    cfg = job_config(GenerateConfig, argv, __doc__)

    def body():
        with job_console("generate", cfg.out) as con:  # the log starts with Ray, after the checks
            run_generate(cfg, progress=con.say)

    return run_job(body)  # prompts and model are checked before Ray starts


if __name__ == "__main__":
    sys.exit(main())
