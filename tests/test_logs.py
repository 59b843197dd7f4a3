import logging
import multiprocessing
import sys

from sdswarm.logs import FILE_FORMAT, TerminalFilter, TerminalFormatter, set_stopping


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


def test_once_the_node_stops_library_errors_leave_the_terminal_in_every_process(tmp_path):
    """hivemind's DHT process logs a closed pipe as an ERROR while the node shuts it down: node.log only."""
    closed_pipe = _record("hivemind.dht.dht", logging.ERROR, "[Errno 2] No such file or directory", FileNotFoundError())
    ours = _record("sdswarm.node", logging.WARNING, "ending without a last round")
    terminal = TerminalFilter(verbose=False)
    assert terminal.filter(closed_pipe)
    fork = multiprocessing.get_context("fork")
    stop_begun, seen = fork.Event(), tmp_path / "seen"

    def forked_before_the_stop() -> None:  # as hivemind's DHT: forked at start, logging while the node stops
        stop_begun.wait(30)
        seen.write_text(str(terminal.filter(closed_pipe)))

    child = fork.Process(target=forked_before_the_stop)
    child.start()
    set_stopping(True)
    try:
        stop_begun.set()
        assert not terminal.filter(closed_pipe) and terminal.filter(ours)
        assert TerminalFilter(verbose=True).filter(closed_pipe)
        child.join(30)
        assert seen.read_text() == "False"
    finally:
        set_stopping(False)
    assert terminal.filter(closed_pipe)
