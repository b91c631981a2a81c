-- The expiry sweep's index is no longer made by migrations. Only delete-on-ack mode reads it,
-- and the multiplexers that run the sweep build it (`Shards::ensure_sweep_index`, CREATE INDEX
-- CONCURRENTLY). In keep mode it held every message ever stored, and every insert paid for an
-- entry that nothing read.
DROP INDEX IF EXISTS messages_unexpired_age;
