"""The test bed on a machine without a database server: an embedded PostgreSQL.

CI runs the suite against its own PostgreSQL 15 (TEST_DATABASE_URL); this test
always takes the other path, so a laptop without PostgreSQL is covered too.
"""

from __future__ import annotations

import pytest

from tests.support.postgres import bootstrap, embedded_server, fresh_database


@pytest.mark.embedded
def test_embedded_server_runs_the_migrations_and_the_worker_functions() -> None:
    with embedded_server() as server, fresh_database(server) as db:
        bootstrap(db)
        with db.connect() as conn:
            conn.execute("select vault.create_secret('http://127.0.0.1:9', 'queue_worker_url')")
            version = conn.execute("show server_version_num").fetchone()
        assert version is not None and int(version[0]) >= 150000

        with db.connect(role="service_role") as conn:
            row = conn.execute(
                "select queue_worker.send('email_queue', '{\"to\": \"a@example.com\"}')"
            ).fetchone()
            assert row is not None
            msg_id = row[0]
            claimed = conn.execute(
                "select msg_id, read_ct, message from queue_worker.claim('email_queue', %s, 30)",
                [[msg_id]],
            ).fetchall()
            assert claimed == [(msg_id, 1, {"to": "a@example.com"})]
            # Claimed messages are invisible: a second claim gets nothing.
            again = conn.execute(
                "select msg_id from queue_worker.claim('email_queue', %s, 30)", [[msg_id]]
            ).fetchall()
            assert again == []
            acked = conn.execute(
                "select * from queue_worker.ack('email_queue', %s)", [[msg_id]]
            ).fetchall()
            assert acked == [(msg_id,)]

        with db.connect() as conn:
            assert conn.execute("select count(*) from pgmq.q_email_queue").fetchone() == (0,)
            # The insert's trigger queued its webhook for pg_net.
            urls = conn.execute("select url from net.http_request_queue").fetchall()
        assert urls == [("http://127.0.0.1:9/webhooks/email_queue",)]
