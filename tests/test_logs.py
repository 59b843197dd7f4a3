import logging
import sys

from sdswarm.logs import FILE_FORMAT, TerminalFilter, TerminalFormatter


def _record(name: str, level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, msg, None, exc_info)


def test_a_library_traceback_is_one_line_on_the_terminal_and_whole_in_the_file():
    message = "Caught an exception when running a coroutine:"
    record = _record("hivemind.dht.dht", logging.ERROR, message, GeneratorExit())
    terminal = TerminalFormatter(verbose=False).format(record)
    assert "\n" not in terminal
    assert "Caught an exception when running a coroutine: (GeneratorExit; traceback in node.log)" in terminal
    assert "Traceback" in logging.Formatter(FILE_FORMAT).format(record)


def test_our_own_tracebacks_and_verbose_mode_keep_the_whole_traceback():
    ours = _record("sdswarm.node", logging.ERROR, "training failed", ValueError("bad"))
    assert "Traceback" in TerminalFormatter(verbose=False).format(ours)
    theirs = _record("hivemind.averaging", logging.ERROR, "round failed", TimeoutError())
    assert "Traceback" in TerminalFormatter(verbose=True).format(theirs)


def test_the_terminal_shows_hivemind_warnings_but_not_its_chatter():
    quiet = TerminalFilter(verbose=False)
    assert quiet.filter(_record("hivemind.averaging", logging.WARNING, "received 80% of input tensors"))
    assert not quiet.filter(_record("hivemind.optim", logging.INFO, "accumulated 8 samples for epoch #3"))
    assert not quiet.filter(_record("asyncio", logging.ERROR, "Task was destroyed but it is pending!"))
    assert TerminalFilter(verbose=True).filter(_record("hivemind.optim", logging.INFO, "accumulated 8 samples"))
