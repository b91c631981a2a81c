-- Body keys issued ahead (delete-on-ack mode; docs/design.md, "Crypto-shredding"). A gateway
-- takes each send's key from a pool its shard issued in one statement for many sends, in place
-- of one statement per few sends that issued keys under their send keys (`body_keys`) while the
-- sends waited. The key is held here under a random 8-byte id, which the sealed body carries
-- (version 2 of its form, `chat_common::seal`), so whoever holds a body finds its key by the id.
-- The ack and the expiry of an unacked message delete the keys of their messages by that id;
-- the store deletes the key of a copy it skips (a client's retry, sealed under another key);
-- the expiry deletes keys no message took by age (a pool's leftovers, a produce that failed).
--
-- `body_keys` stays for the bodies sealed before (version 1: no id in the body); nothing
-- issues into it any more, and the ack and the expiry empty it as those messages go.
CREATE TABLE IF NOT EXISTS sealing_keys (
    id            bytea  PRIMARY KEY CHECK (length(id) = 8),
    key           bytea  NOT NULL CHECK (length(key) = 32),
    created_at_ms bigint NOT NULL
);

CREATE INDEX IF NOT EXISTS sealing_keys_age ON sealing_keys (created_at_ms);

-- The gateways (the reader role) issue keys, and read them to open what they push. Granted
-- here, where the table is made, when the roles exist.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'chat_reader') THEN
        GRANT INSERT ON sealing_keys TO chat_reader;
    END IF;
END $$;
