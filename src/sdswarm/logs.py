"""Where log lines go: a terminal a person can read, and everything in OUTPUT/node.log.

hivemind writes several INFO lines a second ("accumulated N samples", "Pre-scheduling ..."); on the terminal only
its warnings show, unless --verbose. The node's own lines (one per log interval, per averaging round, per swarm
step) and every warning show. The file gets all of it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import sys
from pathlib import Path

from hivemind.utils.logging import use_hivemind_log_handler
from tqdm.auto import tqdm

LOG_FILE = "node.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# asyncio's complaints about the tasks hivemind leaves behind when its processes shut down: not the user's concern
SHUTDOWN_NOISE = ("Task was destroyed but it is pending", "Task exception was never retrieved")
# libraries whose tracebacks (a cancelled DHT coroutine, a closed daemon socket) belong in node.log, not the terminal
LIBRARY_LOGGERS = ("hivemind", "asyncio")
# Set while the node stops its processes; in shared memory, so the forked DHT and averagers see it too (their errors
# about a pipe the parent closed are the ones that show).
_stopping = multiprocessing.RawValue(ctypes.c_bool, False)


class TerminalFilter(logging.Filter):
    """What reaches the terminal: not hivemind's chatter (below WARNING) unless verbose; never shutdown noise, nor,
    once the node has begun its orderly stop, the libraries' errors about pipes and sockets closing under them."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and record.getMessage().startswith(SHUTDOWN_NOISE):
            return False
        if _stopping.value and not self.verbose and record.name.startswith(LIBRARY_LOGGERS):
            return False
        return self.verbose or record.levelno >= logging.WARNING or not record.name.startswith("hivemind")


class TerminalFormatter(logging.Formatter):
    """One line per record: a library's traceback is cut to its exception's name (node.log keeps it whole)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__(TERMINAL_FORMAT)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose or not record.exc_info or not record.name.startswith(LIBRARY_LOGGERS):
            return super().format(record)
        exc_type = record.exc_info[0]
        line = logging.makeLogRecord(record.__dict__)  # a copy: the file handler still formats the traceback
        line.exc_info, line.exc_text, line.stack_info = None, None, None
        line.msg = f"{record.getMessage()} ({exc_type.__name__ if exc_type else 'error'}; traceback in {LOG_FILE})"
        line.args = None
        return super().format(line)


class TerminalHandler(logging.StreamHandler):
    """Log lines above the progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _not_about_torchvision(record: logging.LogRecord) -> bool:
    """transformers 5 warns, when diffusers imports it, that CLIP's image processor falls back to PIL without
    torchvision: no part of a Stable Diffusion training uses one."""
    return "requires torchvision (not installed)" not in record.getMessage()


def setup_logging(*, verbose: bool = False) -> None:
    """The terminal handler; hivemind's records go through the root logger, not through its own handler."""
    use_hivemind_log_handler("nowhere")
    terminal = TerminalHandler(sys.stderr)
    terminal.setFormatter(TerminalFormatter(verbose))
    terminal.addFilter(TerminalFilter(verbose))
    root = logging.getLogger()
    root.handlers = [terminal]
    root.setLevel(logging.INFO)
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_about_torchvision)


def set_stopping(stopping: bool) -> None:
    """Whether the node is stopping its processes: then the libraries' lines go to node.log only."""
    _stopping.value = stopping


def attach_log_file(output_dir: Path) -> logging.Handler:
    """Everything this node logs, hivemind's INFO lines included, in OUTPUT/node.log (appended across runs)."""
    handler = logging.FileHandler(output_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
