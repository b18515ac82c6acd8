"""What a job shows on its terminal: its own stage lines, one progress bar per long stage (tqdm, with
rate and ETA), warnings and errors. Everything else once Ray starts (Ray's, Ray Data's and Ray
Train's own output, the workers' lines) goes to the job's log, `{folder}/_logs/JOB-TIME.log`, whose
path is printed at the start and at the end.

A job's entry point opens the console (`with job_console("train-base", cfg.output) as con`) and
passes `con.say` as the progress callback; `ensure_ray` starts the log just before Ray starts, so
a job refused on its input writes nothing (no folder, no log) and prints its error as before.

A progress message is `STAGE: N/M ...` or `[STAGE] step N/M ...`, optionally after the demo's
`[demo  12s] ` clock; it moves STAGE's bar instead of printing a line. Workers' lines of that
form (they reach the driver through Ray's log forwarding) move bars too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ediffi_platform.storage import is_url

LOG_DIR = "_logs"
_PROGRESS = re.compile(
    r"^(?:\[demo +\d+s\] )?(?:\[(?P<bracketed>[^\]]+)\]|(?P<stage>[^:\[\]]+):) (?:step )?(?P<n>\d+)/(?P<total>\d+)\b(?P<rest>.*)"
)
_current: Console | None = None


class Console:
    """The terminal of one job: lines and bars there, a copy of every line (and, once started, all
    other output of the process) in the log."""

    def __init__(self, job: str, folder: str | None) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(folder) if folder and not is_url(folder) else Path.cwd()
        self.log_path = (base / LOG_DIR / f"{job}-{stamp}.log").absolute()
        self.term = sys.stdout  # until start(): the process's own stdout
        self._bars: dict[str, tqdm] = {}
        self._ended: set[str] = set()  # stages whose driver said they ended: late worker lines move no bar
        self._lock = threading.Lock()
        self._saved: tuple[int, int] | None = None

    def say(self, message: str) -> None:
        """A stage line (printed) or a progress message (moves its bar); always in the log once started."""
        if self._saved:
            print(message, flush=True)  # fd 1 is the log
        if not self._progress(message):
            self._end(message.split("] ", 1)[-1].split(":", 1)[0])
            with self._lock:
                tqdm.write(message, file=self.term)

    def _end(self, stage: str) -> None:
        """A stage line of a stage with an open bar: the stage is over (its bar closed, even if short)."""
        with self._lock:
            bar = self._bars.pop(stage, None)
            if bar is not None:
                bar.close()
                self._ended.add(stage)

    def _advance(self, stage: str, n: int, total: int, rest: str) -> None:
        with self._lock:
            self._ended.discard(stage)
            bar = self._bars.get(stage)
            if bar is None or total != bar.total:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=total, initial=n, desc=stage, file=self.term, mininterval=1.0, dynamic_ncols=True)
                self._bars[stage] = bar
            bar.update(n - bar.n)
            if rest:
                bar.set_postfix_str(rest[:60], refresh=False)
            if n >= total:
                bar.close()
                del self._bars[stage]

    def worker_lines(self, data: dict) -> None:
        """Ray's log-forwarding handler: workers' progress messages move bars (the log gets them anyway)."""
        for line in data.get("lines", ()):
            m = _PROGRESS.match(line)
            if m and (m["bracketed"] or m["stage"]).strip() not in self._ended:
                self._progress(line)

    def _progress(self, message: str) -> bool:
        """Move a bar if `message` is a progress message; False if it is not one."""
        m = _PROGRESS.match(message)
        if m:
            stage = (m["bracketed"] or m["stage"]).strip()
            self._advance(stage, int(m["n"]), int(m["total"]), m["rest"].strip(" ,;"))
        return bool(m)

    def warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """warnings.showwarning: on the terminal and in the log."""
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        if self._saved:
            print(text, file=sys.stderr, flush=True)
        with self._lock:
            tqdm.write(text, file=self.term)

    def start(self) -> None:
        """From here on the process's fds 1 and 2 write to the log; the terminal keeps lines and bars."""
        if self._saved:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.term = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        tqdm.write(f"log: {self.log_path}", file=self.term)
        _forward_worker_lines(self.worker_lines, add=True)

    def stop(self) -> None:
        """Bars closed, fds 1 and 2 back on the terminal, the log's path printed again."""
        for bar in list(self._bars.values()):
            bar.close()
        self._bars.clear()
        if not self._saved:
            return
        _forward_worker_lines(self.worker_lines, add=False)
        _stop_ray()  # before the terminal is back: Ray's log thread still prints what it has buffered
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = None
        self.term.close()
        self.term = sys.stdout
        print(f"log: {self.log_path}", flush=True)


@contextmanager
def job_console(job: str, folder: str | None) -> Iterator[Console]:
    """The console of a job writing to `folder` (its log under `folder/_logs/`; under `./_logs/` when the
    folder is remote or None). Nested calls (the demo's stages) share the outer console."""
    global _current
    if _current is not None:
        yield _current
        return
    con = _current = Console(job, folder)
    showwarning = warnings.showwarning
    warnings.showwarning = con.warning
    terminal = _TerminalHandler(con)
    logging.getLogger().addHandler(terminal)
    try:
        yield con
    finally:
        logging.getLogger().removeHandler(terminal)
        warnings.showwarning = showwarning
        _current = None
        con.stop()


def start_log() -> None:
    """Called just before Ray starts: the current job's console (if any) sends Ray's output to its log."""
    if _current is not None:
        _current.start()


class _TerminalHandler(logging.Handler):
    """Records of WARNING and above that reach the root logger: on the terminal too."""

    def __init__(self, con: Console) -> None:
        super().__init__(logging.WARNING)
        self.con = con

    def emit(self, record: logging.LogRecord) -> None:
        with self.con._lock:
            tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=self.con.term)


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _forward_worker_lines(handler, *, add: bool) -> None:
    """Register or remove a handler of the workers' forwarded lines (Ray's driver-side dispatcher; a
    private API, so bars of worker progress are best-effort: without it the lines are in the log only)."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    try:
        if add:
            dispatcher.add_handler("ediffi_console", handler)
        else:
            dispatcher.remove_handler("ediffi_console")
    except (AttributeError, KeyError):
        pass
