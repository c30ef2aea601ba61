-- fleetsync hub schema 7: partner webhooks (hub/src/outbox/webhooks.rs). Subscriptions,
-- and the rows delivered to them, kept for replays (`POST /v1/ops/webhooks/{id}/replay`)
-- until they are older than `[webhooks] keep_delivered_s`.

CREATE TABLE webhooks (
    id     text COLLATE "C" PRIMARY KEY,
    record text NOT NULL
);

CREATE TABLE outbox_sent (
    seq        bigint PRIMARY KEY,
    id         text COLLATE "C" NOT NULL,
    sink       text COLLATE "C" NOT NULL,
    created_ms bigint NOT NULL,
    row        text NOT NULL
);

CREATE INDEX outbox_sent_by_sink ON outbox_sent (sink, created_ms);
CREATE INDEX outbox_sent_by_age ON outbox_sent (created_ms);
