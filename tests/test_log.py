import io
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
