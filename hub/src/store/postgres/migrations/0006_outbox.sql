-- fleetsync hub schema 6: the transactional outbox (hub/src/outbox): one row per sink for
-- each fact a sink hears of, written in the fact's transaction. `seq` orders a
-- shipment's rows (its facts are written under its row lock); `id` is the row's
-- idempotency key for its whole life. A hub delivering a row holds a lease on it
-- (`lease_until`), so two hubs never deliver one row at once.

CREATE TABLE outbox (
    seq         bigserial PRIMARY KEY,
    id          text COLLATE "C" NOT NULL UNIQUE,
    sink        text COLLATE "C" NOT NULL,
    shipment_id text COLLATE "C" NOT NULL,
    next_ms     bigint NOT NULL DEFAULT 0,
    lease_until bigint NOT NULL DEFAULT 0,
    row         text NOT NULL
);

CREATE INDEX outbox_by_sink ON outbox (sink, seq);
CREATE INDEX outbox_by_shipment ON outbox (sink, shipment_id, seq);

CREATE TABLE deadletters (
    id          text COLLATE "C" PRIMARY KEY,
    sink        text COLLATE "C" NOT NULL,
    shipment_id text COLLATE "C" NOT NULL,
    dead_ms     bigint NOT NULL,
    letter      text NOT NULL
);
