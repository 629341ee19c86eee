"""Generated text may hold NUL, which Postgres stores in neither text nor JSONB. Client input with
NUL is refused (tests/security); what a model wrote is stored with U+FFFD in its place. The soak
test found an evaluation whose examples quoted such an answer: the whole evaluation failed."""

from __future__ import annotations

import json

from app.db import Database, json_dumps
from app.jobs.service import claim, enqueue, fail
from app.models import Job, JobKind, JobStatus


def test_json_dumps_replaces_an_escaped_nul_and_nothing_that_only_looks_like_one() -> None:
    assert json_dumps({"a": "x\x00y"}) == '{"a":"x\\ufffdy"}'
    # A literal backslash followed by "u0000" is text, not a NUL: kept as it is.
    assert json.loads(json_dumps({"a": "\\u0000"})) == {"a": "\\u0000"}
    # An escaped backslash, then a NUL: the backslash stays, the NUL goes.
    assert json.loads(json_dumps(["\\\x00", "\\\\\x00\x00"])) == ["\\\ufffd", "\\\\\ufffd\ufffd"]
    # Keys and the json.dumps fallback (an integer beyond 64 bits) are covered too.
    assert json.loads(json_dumps({"k\x00": 2**70, "t": "\x00"})) == {"k\ufffd": 2**70, "t": "\ufffd"}
    assert json_dumps({"plain": "text"}) == '{"plain":"text"}'


def test_a_job_with_nul_in_its_payload_and_error_is_stored_on_either_database(
    database: Database,
) -> None:
    with database.session() as session:
        job = enqueue(session, JobKind.eval, "eval:nul-test", {"answer": "p\x00q"}, dispatch=False)
        job_id = job.id
    with database.session() as session:
        assert claim(session, job_id, "owner-1", 60.0) is not None
        assert fail(session, job_id, "owner-1", "DataError: answer 'p\x00q'",
                    retryable=False) is JobStatus.failed
    with database.session() as session:
        stored = session.get(Job, job_id)
        assert stored is not None
        assert stored.payload == {"answer": "p\ufffdq"}
        assert stored.error == "DataError: answer 'p\ufffdq'"
