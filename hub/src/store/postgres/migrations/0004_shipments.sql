-- fleetsync hub schema 4: shipments from the ERP, their facts, and the ERP's location ids
-- (hub/src/shipments). Records and facts are JSON documents (serde of the hub's types);
-- the columns beside them are what queries filter and sort on.

CREATE TABLE shipments (
    id          text COLLATE "C" PRIMARY KEY,
    rev         bigint NOT NULL,
    customer_id text COLLATE "C" NOT NULL,
    vehicle     text COLLATE "C",
    state       text   NOT NULL,
    finished    boolean NOT NULL,
    updated_ms  bigint NOT NULL,
    record      text   NOT NULL
);

CREATE INDEX shipments_by_update ON shipments (updated_ms, id);
CREATE INDEX shipments_open_by_vehicle ON shipments (vehicle) WHERE NOT finished;

CREATE TABLE shipment_facts (
    shipment_id text COLLATE "C" NOT NULL REFERENCES shipments ON DELETE CASCADE,
    fact_id     text COLLATE "C" NOT NULL,
    fact        text NOT NULL,
    PRIMARY KEY (shipment_id, fact_id)
);

CREATE TABLE locations (
    id    text COLLATE "C" PRIMARY KEY,
    fence text NOT NULL
);

CREATE TABLE reviews (
    id         text COLLATE "C" PRIMARY KEY,
    status     text   NOT NULL,
    created_ms bigint NOT NULL,
    record     text   NOT NULL
);

CREATE INDEX reviews_by_status ON reviews (status, created_ms, id);
