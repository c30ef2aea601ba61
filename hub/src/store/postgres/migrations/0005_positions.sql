-- fleetsync hub schema 5: each vehicle's newest position (the ETA's input), and the
-- review queue indexed by shipment.

CREATE TABLE positions (
    device  text COLLATE "C" PRIMARY KEY,
    time_ms bigint NOT NULL,
    record  bytea  NOT NULL
);

ALTER TABLE reviews ADD COLUMN shipment_id text COLLATE "C";
UPDATE reviews SET shipment_id = record::json->>'shipment_id';
CREATE INDEX reviews_by_shipment ON reviews (shipment_id) WHERE shipment_id IS NOT NULL;
