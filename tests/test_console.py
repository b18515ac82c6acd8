"""The job console: stage lines and bars on the terminal, everything the process writes once Ray would
start in the job's log, warnings in both, and nothing written for a job that never starts."""

import subprocess
import sys

from ediffi_platform.console import _PROGRESS, job_console


def test_progress_messages_are_told_from_stage_lines():
    stage = lambda m: (m["bracketed"] or m["stage"], int(m["n"]), int(m["total"])) if m else None
    assert stage(_PROGRESS.match("[train base] step 100/1600 loss 0.1")) == ("train base", 100, 1600)
    assert stage(_PROGRESS.match("[demo   12s] generate: 50/100 images, 2.0 img/s")) == ("generate", 50, 100)
    assert stage(_PROGRESS.match("clip fit: step 5/500, contrastive loss 1.2")) == ("clip fit", 5, 500)
    for line in ("demo finished 3/4", "train base: resuming from x (step 5)", "experts: e0 [0, 1) finished"):
        assert _PROGRESS.match(line) is None, line


SCRIPT = """
import os, sys, warnings
from ediffi_platform.console import job_console, start_log

with job_console("job", sys.argv[1]) as con:
    con.say("job: checked the input")  # before the log starts: the terminal only
    assert not os.path.exists(sys.argv[1])
    start_log()
    print("a library's chatter", flush=True)
    os.write(2, b"a worker's stderr\\n")
    con.say("job: started")
    for n in (1, 2, 3):
        con.say(f"job: {n}/3 items, loss 0.{n}")
    warnings.warn("a warning the user must see", stacklevel=1)
print("after the console", flush=True)
sys.stderr.write("stderr again\\n")
"""


def test_the_log_takes_the_process_output_and_the_terminal_keeps_lines_bars_and_warnings(tmp_path):
    """In a process of its own, as a job runs: fds 1 and 2 are the terminal there."""
    (tmp_path / "job.py").write_text(SCRIPT)
    p = subprocess.run(
        [sys.executable, str(tmp_path / "job.py"), str(tmp_path / "out")], capture_output=True, text=True, check=False
    )
    assert p.returncode == 0, p.stderr
    (log,) = (tmp_path / "out" / "_logs").glob("job-*.log")
    text = log.read_text()
    assert "a library's chatter" in text and "a worker's stderr" in text and "job: started" in text
    assert "job: 3/3 items" in text and "a warning the user must see" in text
    assert "chatter" not in p.stdout + p.stderr and "worker's stderr" not in p.stdout + p.stderr
    assert "job: checked the input" in p.stdout and "job: started" in p.stdout
    assert "3/3" in p.stdout and "100%" in p.stdout and "a warning the user must see" in p.stdout
    assert p.stdout.count(f"log: {log}") == 2  # at the start and at the end
    assert p.stdout.rstrip().endswith("after the console") and p.stderr == "stderr again\n"
    assert "after the console" not in text


def test_a_job_refused_before_ray_starts_writes_no_log(tmp_path, capfd):
    try:
        with job_console("job", str(tmp_path / "out")) as con:
            con.say("job: bad input")
            raise ValueError("bad input")
    except ValueError:
        pass
    assert not (tmp_path / "out").exists() and "job: bad input" in capfd.readouterr().out
