-- fleetsync hub schema 5: each vehicle's newest position (the ETA's input), the review
-- queue indexed by shipment, and the shipments at each ERP location (stop) id.

CREATE TABLE positions (
    device  text COLLATE "C" PRIMARY KEY,
    time_ms bigint NOT NULL,
    record  bytea  NOT NULL
);

ALTER TABLE reviews ADD COLUMN shipment_id text COLLATE "C";
UPDATE reviews SET shipment_id = record::json->>'shipment_id';
CREATE INDEX reviews_by_shipment ON reviews (shipment_id) WHERE shipment_id IS NOT NULL;

-- Every stop a shipment's versions named (readers check the record for the current ones).
CREATE TABLE shipment_stops (
    stop_id     text COLLATE "C" NOT NULL,
    shipment_id text COLLATE "C" NOT NULL REFERENCES shipments ON DELETE CASCADE,
    PRIMARY KEY (stop_id, shipment_id)
);
INSERT INTO shipment_stops (stop_id, shipment_id)
    SELECT DISTINCT st->>'id', s.id FROM shipments s, json_array_elements(s.record::json->'spec'->'stops') st
    ON CONFLICT DO NOTHING;
