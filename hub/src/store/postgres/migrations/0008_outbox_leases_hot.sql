-- fleetsync hub schema 8: room on each outbox page for its rows' leases. A lease (and
-- a retry's next_ms and row) changes no indexed column, so with free space on the page
-- PostgreSQL writes the new version beside the old one (a heap-only update) instead of
-- adding an entry to each of the table's four indexes, entries that every later scan of
-- the outbox then walks past until vacuum. Rows are short-lived (deleted once delivered):
-- half-empty pages cost little. Pages written before this keep their fill.

ALTER TABLE outbox SET (fillfactor = 50);
