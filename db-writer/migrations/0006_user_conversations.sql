-- The per-user conversation index: for each user, each conversation they take part in, in the
-- user's home shard (the locator over the user id, `Locator::home_of`), so that one query on one
-- shard finds what a connect needs: the conversations with something pending for the user, the
-- receipts of their own messages, their failed sends, and the conversation list.
--
-- The multiplexer writes it in each batch after the store and the acks and before any routing,
-- and only moves columns forward (every column is the greatest value seen, and the receipt time
-- goes with the greatest peer watermark): a write repeated by a replay, a retry or a zombie
-- writer changes nothing, and writes in any order end in the same row. The invariant the sync
-- relies on: a message pending for a user has its conversation here with `last_in_seq` at or
-- above its seq before the message can be routed (docs/design.md).
CREATE TABLE user_conversations (
    user_id          text   NOT NULL,
    conversation     text   NOT NULL,
    peer             text   NOT NULL,
    -- The conversation's last seq (either direction) and its send time.
    last_seq         bigint NOT NULL DEFAULT 0,
    last_activity_ms bigint NOT NULL DEFAULT 0,
    -- The highest seq of a message to this user: something is pending when it is above
    -- `read_up_to`.
    last_in_seq      bigint NOT NULL DEFAULT 0,
    -- The user's ack watermark in this conversation (the `acks` row of the direction toward them).
    read_up_to       bigint NOT NULL DEFAULT 0,
    -- The peer's watermark of this user's messages, and when it last moved: the receipt.
    peer_read_up_to  bigint NOT NULL DEFAULT 0,
    peer_read_at_ms  bigint,
    -- The last time one of this user's messages here was set aside (`failed_messages`).
    failed_at_ms     bigint,
    PRIMARY KEY (user_id, conversation)
) WITH (fillfactor = 70);

-- The conversation list, newest activity first.
CREATE INDEX user_conversations_by_activity
    ON user_conversations (user_id, last_activity_ms DESC, conversation DESC);

-- Whether the index holds everything the shards do. A shard created empty starts built; a shard
-- that already holds messages waits for `db-writer rebuild-index`, and until every shard says
-- built, gateways sync the old way (every shard).
CREATE TABLE index_state (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    built     bool NOT NULL
);
INSERT INTO index_state (built) SELECT NOT EXISTS (SELECT 1 FROM messages);
