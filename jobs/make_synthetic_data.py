"""Write the synthetic captioned-shapes dataset as img2dataset-style Parquet shards.

python jobs/make_synthetic_data.py data.output=data/synthetic data.rows=2000 data.shards=4
"""

import sys

from ediffi_platform.config import job_config, run_job
from ediffi_platform.synthetic import SyntheticJob, write_synthetic


def main(argv=None) -> int:
    job = job_config(SyntheticJob, argv, __doc__)  # e.g. data.rows=2000 data.output=...

    def body():
        urls = write_synthetic(job.data, job.storage)
        print(f"wrote {job.data.rows} rows in {len(urls)} shards to {job.data.output}")

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
