-- Acks as a watermark per (conversation, recipient) instead of a timestamp on every message.
--
-- An ack is cumulative ("everything sent to me in this conversation up to seq N"), so one row
-- per direction of a conversation holds it. Acking updates that small row in place: it changes
-- no indexed column, so Postgres can do it without touching any index (a HOT update), where
-- setting `messages.acked_at_ms` wrote a new version of every acked message and an entry in
-- each of its indexes. A message is acked when its seq is at or below its direction's
-- `up_to_seq`, or expired when `expired_at_ms` is set.
CREATE TABLE acks (
    conversation text   NOT NULL,
    recipient    text   NOT NULL,
    -- The other user of the conversation: whose messages this watermark acknowledges.
    sender       text   NOT NULL,
    -- Every message to `recipient` in `conversation` with seq <= up_to_seq is acknowledged.
    up_to_seq    bigint NOT NULL DEFAULT 0,
    -- When up_to_seq last moved (the recipient's ack time); NULL until the first ack.
    acked_at_ms  bigint,
    PRIMARY KEY (conversation, recipient)
) WITH (fillfactor = 50);

-- The sync query: a user's conversations, then what is above each watermark.
CREATE INDEX acks_by_recipient ON acks (recipient);
-- Receipts a sender missed while offline.
CREATE INDEX acks_by_sender ON acks (sender);

-- The watermarks of what is already stored: acks were cumulative, so every message at or below
-- the highest acked seq of its direction is acked (or expired).
INSERT INTO acks (conversation, recipient, sender, up_to_seq, acked_at_ms)
SELECT conversation, recipient, min(sender),
       coalesce(max(seq) FILTER (WHERE acked_at_ms IS NOT NULL), 0),
       max(acked_at_ms)
FROM messages
GROUP BY conversation, recipient;

DROP INDEX messages_pending;
DROP INDEX messages_acked_by_sender;
DROP INDEX messages_unacked_age;
ALTER TABLE messages DROP COLUMN acked_at_ms;

-- What is above a watermark, per direction of a conversation (the sync query and the erasure
-- of acknowledged bodies in delete-on-ack mode).
CREATE INDEX messages_to ON messages (conversation, recipient, seq)
    WHERE expired_at_ms IS NULL;

-- The expiry sweep (delete-on-ack mode): messages not yet expired, by age. The sweep marks every
-- message older than the retention window expired, acked or not, so in that mode this index
-- holds only the window. (Keep mode runs no sweep; the index then costs an append per insert.)
CREATE INDEX messages_unexpired_age ON messages (sent_at_ms)
    WHERE expired_at_ms IS NULL;

-- Each message with its state, for operators and checks.
CREATE VIEW message_status AS
SELECT m.conversation, m.seq, m.message_id, m.client_message_id, m.sender, m.recipient, m.body,
       m.sent_at_ms, m.expired_at_ms, m.stored_at,
       m.seq <= coalesce(k.up_to_seq, 0) AS acked
FROM messages m
LEFT JOIN acks k ON k.conversation = m.conversation AND k.recipient = m.recipient;
