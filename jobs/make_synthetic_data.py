"""Write the synthetic captioned-shapes dataset as img2dataset-style Parquet shards.

python jobs/make_synthetic_data.py data.output=data/synthetic data.rows=2000 data.shards=4
"""

import sys
from dataclasses import dataclass, field

from ediffi_platform.config import job_config, run_job
from ediffi_platform.storage import StorageConfig
from ediffi_platform.synthetic import SyntheticConfig, write_synthetic


@dataclass(frozen=True)
class Job:
    """make_synthetic_data settings."""

    data: SyntheticConfig = field(default_factory=SyntheticConfig)  # what to write
    storage: StorageConfig = field(default_factory=StorageConfig)  # S3 endpoint / credentials


def main(argv=None) -> int:
    job = job_config(Job, argv, __doc__)  # e.g. data.rows=2000 data.output=...

    def body():
        urls = write_synthetic(job.data, job.storage)
        print(f"wrote {job.data.rows} rows in {len(urls)} shards to {job.data.output}")

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
