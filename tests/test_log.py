import io
import logging
import json

import structlog

from worker import log


def test_json_lines_with_bound_coordinates():
    buf = io.StringIO()
    log.configure("json", "info", stream=buf)
    logger = log.get("t").bind(topic="images", partition=3, offset=1812)
    logger.info("batch", size=4, skipped=None)
    logger.debug("hidden")
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.startswith("{")]
    assert len(lines) == 1
    rec = lines[0]
    assert rec["event"] == "batch" and rec["level"] == "info"
    assert (rec["topic"], rec["partition"], rec["offset"], rec["size"]) == ("images", 3, 1812, 4)
    assert "skipped" not in rec and "timestamp" in rec
    structlog.reset_defaults()
    log.configure("json", "warning")


def test_drop_empty_is_a_plain_processor():
    assert log.drop_empty(None, "info", {"a": 1, "b": None}) == {"a": 1}


def test_library_logs_through_the_standard_library_are_json_lines():
    buf = io.StringIO()
    log.configure("json", "info", stream=buf)
    try:
        logging.getLogger("aiokafka.consumer.group_coordinator").warning(
            "Heartbeat failed for group %s because it is rebalancing", "g-1")
        logging.getLogger("aiokafka.conn").info("chatty")  # below warning: left out
        try:
            raise ConnectionError("refused")
        except ConnectionError:
            logging.getLogger("aiokafka").exception("Unable connect to %r", "127.0.0.1:9092")
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]  # every line parses
        assert [(r["level"], r["event"]) for r in lines] == [
            ("warning", "Heartbeat failed for group g-1 because it is rebalancing"),
            ("error", "Unable connect to '127.0.0.1:9092'")]
        assert lines[0]["logger"] == "aiokafka.consumer.group_coordinator" and "timestamp" in lines[0]
        assert "ConnectionError: refused" in lines[1]["exception"]
        log.configure("json", "info", stream=buf)  # configuring again replaces the handler: one line, not two
        logging.getLogger("aiokafka").warning("once")
        assert buf.getvalue().count('"once"') == 1
    finally:
        structlog.reset_defaults()
        log.configure("json", "warning")


def _three_processes_on_one_pipe(lines: int, pad: int, lock: str | None = None) -> list[dict]:
    """Three processes logging ``lines`` lines of ``pad`` bytes each to one pipe, unbuffered (as in the
    image); the lines read back, each parsed (a cut or spliced one fails here)."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    code = ("import sys; from worker import log; log.configure('json', 'info'); log.bind_process(sys.argv[1]); "
            f"log.lock_lines({lock!r}); l = log.get('t'); "
            f"[l.info('line', i=i, pad='x' * {pad}) for i in range({lines})]")
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 1 << 16), b"")))
    reader.start()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{k}"], stderr=write_end, env=env) for k in range(3)]
    os.close(write_end)
    for proc in procs:
        assert proc.wait(60) == 0
    reader.join(60)
    os.close(read_end)
    parsed = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    assert {(r["process"], r["i"]) for r in parsed} == {(f"p{k}", i) for k in range(3) for i in range(lines)}
    return parsed


def test_lines_longer_than_a_pipe_writes_whole_are_written_under_the_pods_file_lock(tmp_path):
    """A pipe takes up to 4 KiB in one piece; 20 KB lines of three processes were cut into each other
    without the lock (68 of 1,200 did not parse here). The supervisor and its children share the lock
    file of the run folder (log.lock_lines)."""
    import select

    parsed = _three_processes_on_one_pipe(400, 20_000, lock=str(tmp_path / "log.lock"))
    assert len(parsed) == 1200 and 20_000 > 4 * select.PIPE_BUF


def test_processes_sharing_one_stream_write_whole_lines():
    """The supervisor, the GPU process and the intakes share one stdout/stderr (a pipe, in a container).
    Unbuffered (PYTHONUNBUFFERED, as in the image), print() wrote a line and its newline in two writes, and
    another process's line could land between them: 274 of 9,000 lines did not parse here before the fix."""
    assert len(_three_processes_on_one_pipe(3000, 200)) == 9000


def test_the_signal_handlers_logger_writes_the_same_lines_without_the_streams_lock(tmp_path):
    """A signal handler runs in the thread it interrupted, which may hold the stream's lock mid-line: its
    logger writes with os.write, and its lines are those of log.get (fields, process name, JSON)."""
    path = tmp_path / "log.jsonl"
    with open(path, "w") as stream:
        log.configure("json", "info", stream=stream)
        log.bind_process("intake-3")
        try:
            with log._LINES._thread_lock:  # held, as by an interrupted line: taking it would wait forever
                log.for_signal_handler().warning("stack dump", thread="MainThread (1)", stack="here")
        finally:
            structlog.reset_defaults()
            log.configure("json", "warning")
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert (line["event"], line["process"], line["thread"], line["level"]) == (
        "stack dump", "intake-3", "MainThread (1)", "warning")
