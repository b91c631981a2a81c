-- Exports of a time range (`db-writer export`) page through messages by send time.
CREATE INDEX messages_sent_at ON messages (sent_at_ms, message_id);
