"""The whole chain on a laptop, no GPU, no cluster, no downloads (9-13 minutes on 2 CPU cores):
synthetic data -> embeddings -> base model -> experts -> batch generation -> evaluation -> report.

python jobs/demo.py                       # everything under ./demo; run again to resume
python jobs/demo.py base_steps=100 expert_steps=40 eval_prompts=20 workdir=/tmp/demo-small
"""

import sys

from ediffi_platform.cluster import ensure_ray
from ediffi_platform.config import job_config, run_job
from ediffi_platform.console import job_console
from ediffi_platform.demo import JUDGED, DemoConfig, acceptance, run_demo, standard_error
from ediffi_platform.judge import SHAPE_BY_SIZE


def main(argv=None) -> int:
    cfg = job_config(DemoConfig, argv, __doc__)

    def body():
        with job_console("demo", cfg.workdir) as con:
            ensure_ray(num_cpus=2)
            s = run_demo(cfg, progress=con.say)
        a, n = s["alignment"], cfg.eval_prompts
        print()
        print(f"demo finished in {s['seconds'] / 60:.1f} min; {n} held-out captions, +- one standard error")
        for name in ("base", "ensemble"):
            print(
                f"  {name:9s} "
                + "  ".join(f"{k} {100 * a[name][k]:.0f}+-{100 * standard_error(a[name][k], n):.0f}%" for k in JUDGED)
                + "  "
                + "  ".join(f"{k} {100 * a[name][k]:.0f}%" for k in SHAPE_BY_SIZE.values() if k in a[name])
            )
        print("  bar:       " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in acceptance(a, n).items()))
        print(f"  images:     {s['images']}/")
        print(f"  grid:       {s['grid']}")
        print(f"  report:     {s['report']}")
        print(f"  MLflow UI:  {s['mlflow']}   (then open http://127.0.0.1:5000)")

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
