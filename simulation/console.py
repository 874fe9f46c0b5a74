"""What a person sees while a run works: our own lines on the console, every library's lines in the run's log file.

By default the console gets our loggers' INFO lines (one per phase), the progress bars and any library's ERROR;
Flower's INFO/DEBUG lines, alembic's, Ray's and Python warnings (FutureWarnings, Flower's deprecation notices) go only
to <run-dir>/logs/console.log, as do native lines written to stderr's descriptor (Ray's C++ core worker). `--verbose`
shows everything on the console as well (Flower's lines through Flower's own handler, so none is printed twice) and
transformers' progress bars.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from flwr.common.logger import console_handler as flower_console
from transformers.utils import logging as hf_logging

OURS = ("oppu", "common", "client", "server", "simulation", "bench")  # top-level names of our loggers
LOG_FILE = Path("logs") / "console.log"  # under the run directory


class _ConsoleFilter(logging.Filter):
    """Ours, and other libraries' errors; with --verbose everything but Flower's (Flower's handler prints those)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".")[0]
        if self.verbose:
            return top != "flwr"
        return top in OURS or record.levelno >= logging.ERROR


def setup_console(verbose: bool) -> None:
    """Once per command: our console handler on the root logger, warnings into logging, Flower's console handler
    off unless `verbose`."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):  # ours from an earlier call, or a library's basicConfig (absl's, at import)
        if not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_ConsoleFilter(verbose))
    root.addHandler(handler)
    logging.captureWarnings(True)
    _route_ray_through_root()
    flower = logging.getLogger("flwr")
    if verbose:
        if flower_console not in flower.handlers:
            flower.addHandler(flower_console)
        hf_logging.enable_progress_bar()
    else:
        flower.removeHandler(flower_console)
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars (the server loads the base once)


def _route_ray_through_root() -> None:
    """Ray's driver-side lines (e.g. its warning that a small /dev/shm puts the object store in /tmp) to our handlers:
    `import ray` gives its logger a stderr handler of its own that skips the root logger, so they would reach the
    console and never the run's log."""
    import ray  # noqa: F401  (configures the "ray" logger once, at import)

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True


class _LinesToLog(io.TextIOBase):
    """A stdout that logs each line it is given (Ray's driver prints its workers' and raylet's messages there)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


@contextlib.contextmanager
def _native_stderr_into(path: Path) -> Iterator[None]:
    """What native code writes straight to file descriptor 2 appended to `path` (Ray's C++ core worker prints an
    ERROR line there when Flower shuts Ray down while its actors' terminate calls are in flight); Python's sys.stderr
    (our console lines, the bars, a traceback) keeps the terminal through a copy of the descriptor."""
    sys.stderr.flush()
    terminal = os.dup(2)
    python_writes_fd2 = _fileno(sys.stderr) == 2
    saved, streams = sys.stderr, []
    if python_writes_fd2:
        sys.stderr = open(terminal, "w", buffering=1, encoding=saved.encoding, errors="backslashreplace", closefd=False)
        streams = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler and h.stream is saved]
        for handler in streams:
            handler.setStream(sys.stderr)
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        if python_writes_fd2:
            for handler in streams:
                handler.setStream(saved)
            sys.stderr.close()
            sys.stderr = saved
        os.close(terminal)


def _fileno(stream: io.TextIOBase) -> int:
    """The stream's descriptor, -1 for one without (pytest's capture)."""
    try:
        return stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return -1


@contextlib.contextmanager
def run_log(run_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """Every library's log lines and warnings, DEBUG and up, appended to <run_dir>/logs/console.log while the run
    lasts (appended: a resumed run keeps the first attempt's lines); unless `verbose`, what is printed to stdout
    meanwhile goes there too (stdout is for the final table), and so do native lines written to stderr's descriptor."""
    path = run_dir / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        with contextlib.ExitStack() as quiet:
            if not verbose:
                quiet.enter_context(contextlib.redirect_stdout(_LinesToLog(logging.getLogger("stdout"))))
                quiet.enter_context(_native_stderr_into(path))
            yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
