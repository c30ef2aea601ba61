-- fleetsync hub schema 6: the transactional outbox (hub/src/outbox): one row per sink for
-- each fact a sink hears of, written in the fact's transaction. `seq` orders a
-- shipment's rows (its facts are written under its row lock); `id` is the row's
-- idempotency key for its whole life.

CREATE TABLE outbox (
    seq         bigserial PRIMARY KEY,
    id          text COLLATE "C" NOT NULL UNIQUE,
    sink        text COLLATE "C" NOT NULL,
    shipment_id text COLLATE "C" NOT NULL,
    row         text NOT NULL
);

CREATE INDEX outbox_by_sink ON outbox (sink, seq);
