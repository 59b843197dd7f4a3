"""The last lines of this node's log, kept in memory for its UI (the log panel)."""

from __future__ import annotations

import contextlib
import logging
from collections import deque

TRACEBACK = "Traceback (most recent call last):"


class LogTail(logging.Handler):
    """The last lines of this node's log, kept in memory for its UI."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # the tail is public (the UI's log panel): a traceback (local paths, code) stays in node.log
        with contextlib.suppress(Exception):
            message = record.getMessage()
            public = message.split(TRACEBACK)[0].rstrip()
            if record.exc_info or record.stack_info or public != message.rstrip():
                public += " (traceback in node.log)"
            self.lines.append(self.format(logging.makeLogRecord({
                **record.__dict__, "msg": public, "args": None, "exc_info": None, "exc_text": None,
                "stack_info": None})))

    @contextlib.contextmanager
    def attached(self):
        hivemind = logging.getLogger("hivemind")  # does not propagate unless logs.setup_logging said so
        loggers = [logging.getLogger()] + ([] if hivemind.propagate else [hivemind])
        for logger in loggers:
            logger.addHandler(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeHandler(self)
