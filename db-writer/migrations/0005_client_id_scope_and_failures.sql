-- Idempotency by (conversation, sender, client message id) instead of by message id.
--
-- Message ids were a hash of the sender and the client message id only, so the same client id
-- toward another recipient was taken for a retry (and lost, or stored under another message's
-- id). Ids now hash the recipient too (chat_common::ids::message_id), and the store deduplicates
-- on what a retry has in common with its original whatever id scheme the gateway that accepted
-- it used: the conversation, the sender and the client message id. Existing rows satisfy the new
-- index: the old UNIQUE (message_id) already made (sender, client message id) unique.
--
-- One unique index per row, not two: the UNIQUE (message_id) constraint goes (nothing looks a
-- message up by id alone any more; the export pages by messages_sent_at, which stays). The index
-- holds a 16-byte fingerprint of the triple (md5 of the three ids joined by '\n', which no id
-- contains), not the triple itself: an index of the three text columns was 3.4 times the size of
-- the uuid index it replaces (130 MB against 38 MB a million rows) and inserts into it were
-- 20 to 40% slower from the second million rows on; the fingerprint costs what the id did
-- (docs/design.md). md5 is a compact key here, not a defence: its inputs are validated ids of a
-- closed alphabet, at most 64 bytes each, and lookups compare the triple itself too.
CREATE UNIQUE INDEX messages_send_key
    ON messages ((md5(conversation || E'\n' || sender || E'\n' || client_message_id)::uuid));
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_message_id_key;

-- Messages the multiplexer set aside (dead-lettered) because the store can never hold them,
-- remembered so that the sender learns it at the next sync. Only validated ids and the store's
-- own reason text: nothing of the refused body, so this row can always be written.
CREATE TABLE failed_messages (
    conversation      text   NOT NULL,
    sender            text   NOT NULL,
    client_message_id text   NOT NULL,
    message_id        text   NOT NULL,
    recipient         text   NOT NULL,
    code              text   NOT NULL,
    reason            text   NOT NULL,
    failed_at_ms      bigint NOT NULL,
    PRIMARY KEY (conversation, sender, client_message_id)
);

-- The sync's lookup: a sender's recent failures.
CREATE INDEX failed_messages_by_sender ON failed_messages (sender, failed_at_ms);
