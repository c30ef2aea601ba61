-- fleetsync hub schema 3: credentials of the ERP, operators and customers (hub/src/auth.rs).
-- Only the sha256 of a token is kept.

CREATE TABLE credentials (
    id           text COLLATE "C" PRIMARY KEY,
    role         text   NOT NULL CHECK (role IN ('erp', 'operator', 'customer')),
    name         text   NOT NULL,
    customer_id  text COLLATE "C",
    token_sha256 bytea  NOT NULL UNIQUE,
    created_ms   bigint NOT NULL,
    CHECK ((role = 'customer') = (customer_id IS NOT NULL))
);
