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
-- message up by id alone any more; the export pages by messages_sent_at, which stays).
CREATE UNIQUE INDEX messages_client_message ON messages (conversation, sender, client_message_id);
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
