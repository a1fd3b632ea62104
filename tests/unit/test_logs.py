from __future__ import annotations

import logging

from shared.logs import StableFieldsFormatter


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gpu_worker.consumer", logging.INFO, __file__, 1, "settled %s", ("ok",), None)
    record.__dict__.update(extra)
    return record


def test_stable_fields_are_appended_in_a_fixed_order() -> None:
    line = StableFieldsFormatter("%(message)s").format(_record(action="complete", job_id="j1", delivery_count=0))
    assert line == "settled ok [job_id=j1 delivery_count=0 action=complete]"


def test_a_record_without_fields_is_left_alone() -> None:
    assert StableFieldsFormatter("%(levelname)s %(message)s").format(_record()) == "INFO settled ok"
