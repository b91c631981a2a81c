-- The incremental export's cursor (`db-writer export --cursor`): the transaction that inserted
-- each message, so that an export can take exactly the rows committed since the previous one.
--
-- Nothing else a row holds orders commits: `sent_at_ms` is the gateway's clock, `seq` is per
-- conversation, `stored_at` is the inserting transaction's start, and two multiplexer batches on
-- one shard commit in either order. A transaction id compared with the previous export's
-- snapshot (`pg_visible_in_snapshot`) does: a row is exported by the first export whose snapshot
-- sees its transaction committed, and by no other (docs/design.md, "Incremental export").
--
-- The id is the 64-bit, epoch-extended one (`pg_current_xact_id`, which never wraps) stored as a
-- bigint, so that a BRIN index can hold it: BRIN has no operator class for xid8, and a row's
-- transaction id grows with the table's append order, which is what BRIN summarises. The index
-- is a few pages per million rows and costs an insert next to nothing, where a btree would be a
-- fifth full index on the insert path. Rows stored before this migration keep NULL: every
-- snapshot sees them, so only the first export of a cursor takes them. Adding a nullable column
-- rewrites nothing; the default applies to rows inserted from now on, whichever process inserts
-- them.
ALTER TABLE messages ADD COLUMN insert_xid bigint;
ALTER TABLE messages ALTER COLUMN insert_xid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX messages_insert_xid ON messages USING brin (insert_xid);
