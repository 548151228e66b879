-- Dead letters produced again to their original topic by
-- `paystream dlq redrive` (see crates/replay/README.md). One row per
-- dead-letter position: a second redrive of the same position is refused
-- (unless --force), so a dead letter is redriven once.
-- Instants are microseconds since the Unix epoch.
CREATE TABLE replay_redrives (
    dlq_topic          TEXT   NOT NULL,
    dlq_partition      BIGINT NOT NULL,
    dlq_offset         BIGINT NOT NULL,
    -- What the dead letter says about where it came from, to tell a
    -- recreated dead-letter topic (offsets starting over) from this one.
    original_topic     TEXT   NOT NULL,
    original_partition BIGINT,
    original_offset    BIGINT,
    event_id           TEXT,
    -- 'producing': claimed, not yet acknowledged (a crash here leaves the
    -- outcome in doubt); 'produced': acknowledged at produced_*.
    state              TEXT   NOT NULL CHECK (state IN ('producing', 'produced')),
    -- Random token of the redrive that last claimed the row: releasing a
    -- claim or recording its produce only touches the row while it still
    -- holds this token (a forced redrive meanwhile takes it over).
    claim_token        TEXT   NOT NULL,
    redrives           BIGINT NOT NULL DEFAULT 0,
    claimed_at         BIGINT NOT NULL,
    produced_at        BIGINT,
    produced_partition BIGINT,
    produced_offset    BIGINT,
    -- Set when this dead letter was not produced itself but recorded as
    -- redriven together with another dead letter of the same original
    -- message (one dead letter per consumer group): that one's position.
    same_as_partition  BIGINT,
    same_as_offset     BIGINT,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
