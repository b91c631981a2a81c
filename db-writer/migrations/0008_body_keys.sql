-- Crypto-shredding (delete-on-ack mode; docs/design.md, "Crypto-shredding"). A gateway seals
-- each body under a key of its own before the message enters `inbound`, and keeps the key here,
-- in the conversation's shard, under the message's send key. The row holds the sealed body
-- (`sealed`, with `body` NULL). The recipient's ack, or the expiry of an unacked message,
-- deletes the key in the statement that erases the row's body: every copy of the body in Kafka
-- (inbound, outbound, dead letters) and in backups becomes unreadable at once. Keep mode writes
-- neither column nor table. (`IF NOT EXISTS`: tests that store into a schema of an earlier
-- release with today's store add the two first.)
ALTER TABLE messages ADD COLUMN IF NOT EXISTS sealed bytea;

CREATE TABLE IF NOT EXISTS body_keys (
    conversation      text   NOT NULL,
    sender            text   NOT NULL,
    client_message_id text   NOT NULL,
    key               bytea  NOT NULL CHECK (length(key) = 32),
    created_at_ms     bigint NOT NULL,
    PRIMARY KEY (conversation, sender, client_message_id)
);

-- Keys whose message never arrived (a produce that failed after the key was issued) are swept
-- with the unacked messages' expiry, by age.
CREATE INDEX IF NOT EXISTS body_keys_age ON body_keys (created_at_ms);

-- The gateways (the reader role) issue keys, and read them to open what they push; nothing else
-- of the store is theirs to write. Granted here, where the table is made, when the roles exist
-- (the local plaintext stack and most tests run without them).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'chat_reader') THEN
        GRANT INSERT, UPDATE ON body_keys TO chat_reader;
    END IF;
END $$;
