-- Per-conversation sequence counters. One row per conversation; its lock serialises writers of
-- that conversation, which makes sequence numbers dense and never given twice.
CREATE TABLE conversations (
    conversation text PRIMARY KEY,
    last_seq     bigint NOT NULL DEFAULT 0
);

-- Every stored message. A row outlives its content: in delete-on-ack mode the body is erased
-- (set to NULL) when the recipient acks, but the row (its id and seq) stays, so a replay of the
-- inbound log finds the id present and never writes the content back.
CREATE TABLE messages (
    conversation      text   NOT NULL,
    seq               bigint NOT NULL,
    message_id        uuid   NOT NULL,
    client_message_id text   NOT NULL,
    sender            text   NOT NULL,
    recipient         text   NOT NULL,
    body              text,
    sent_at_ms        bigint NOT NULL,
    acked_at_ms       bigint,
    -- Set when an unacked message outlived the retention window (delete-on-ack mode): the body
    -- is erased and the message is no longer pending.
    expired_at_ms     bigint,
    stored_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation, seq),
    UNIQUE (message_id)
);

-- What a user has not acknowledged yet: the sync query on connect.
CREATE INDEX messages_pending ON messages (recipient, conversation, seq)
    WHERE acked_at_ms IS NULL AND expired_at_ms IS NULL;

-- Receipts a sender missed while offline: acks of their messages, newest first.
CREATE INDEX messages_acked_by_sender ON messages (sender, acked_at_ms)
    WHERE acked_at_ms IS NOT NULL;

-- The expiry sweep (delete-on-ack mode): unacked messages by age.
CREATE INDEX messages_unacked_age ON messages (sent_at_ms)
    WHERE acked_at_ms IS NULL AND expired_at_ms IS NULL;
