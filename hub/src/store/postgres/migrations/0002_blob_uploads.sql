-- fleetsync hub schema 2: blob uploads in progress belong to the device that sends them.
-- Parts kept under schema 1 had no owner; they are dropped (agents send every blob that
-- was not acknowledged again, whole).

DROP TABLE blob_parts;

CREATE TABLE blob_uploads (
    device     text COLLATE "C" NOT NULL,
    sha256     bytea  NOT NULL,
    total_len  bigint NOT NULL,
    stored     bigint NOT NULL,   -- bytes of parts
    updated_ms bigint NOT NULL,   -- hub clock at the last chunk
    PRIMARY KEY (device, sha256)
);

CREATE INDEX blob_uploads_by_age ON blob_uploads (updated_ms);

CREATE TABLE blob_parts (
    device text COLLATE "C" NOT NULL,
    sha256 bytea  NOT NULL,
    off    bigint NOT NULL,
    data   bytea  NOT NULL,
    PRIMARY KEY (device, sha256, off),
    FOREIGN KEY (device, sha256) REFERENCES blob_uploads ON DELETE CASCADE
);
