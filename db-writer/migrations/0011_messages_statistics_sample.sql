-- A smaller sample for the statistics of `messages`: 3,000 rows in place of 30,000.
--
-- ANALYZE reads 300 rows for each step of the largest statistics target among a table's
-- columns and expression indexes (default_statistics_target 100: 30,000 rows, read from as
-- many pages). On `messages` that is 0.2 to 0.4 s of one core a shard, and autovacuum runs it
-- whenever a tenth of the table has been written since the last: once a minute on every shard
-- of a store that is filling up at a few thousand messages a second. Under load that pass cost
-- delete-on-ack mode the 60 s confirms of `make bench` (docs/performance-log.md, 2026-12-05).
--
-- Nothing reads `messages` but by an index whose leading columns are bound by equality (the
-- conversation; the conversation and recipient; the send key) or by a range of a column that
-- grows with time (the sweeps' ages, the export's send times and transaction ids), so finer
-- statistics have little to choose between. On a million rows of the bench's shape, by hand:
-- ANALYZE 21 ms against 214, and the same plans at 10 as at 100 for the history page, the
-- pending sync, the ack's join to `messages` and the expiry sweep.
--
-- The target is per column. A column added to `messages` later gets the default, which alone
-- brings the 30,000 rows back: give it the same target (a test checks every column).
DO $$
DECLARE
    col name;
BEGIN
    FOR col IN
        SELECT attname FROM pg_attribute
        WHERE attrelid = 'messages'::regclass AND attnum > 0 AND NOT attisdropped
    LOOP
        EXECUTE format('ALTER TABLE messages ALTER COLUMN %I SET STATISTICS 10', col);
    END LOOP;
END $$;

-- The send key's expression has statistics of its own, sampled with the table's.
ALTER INDEX messages_send_key ALTER COLUMN 1 SET STATISTICS 10;
