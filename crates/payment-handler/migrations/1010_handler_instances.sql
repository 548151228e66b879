-- Running handler instances and their heartbeats (issue 16). An
-- Idempotency-Key's owner token starts with the instance that holds it, so
-- a retry can tell a holder that died (no heartbeat for a few seconds: take
-- the key over now) from one that is alive but slow (wait: the lease guards
-- it).
CREATE TABLE handler_instances (
    instance_id  TEXT   PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL
);
