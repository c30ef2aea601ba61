-- fleetsync hub schema 1: events, devices, blobs, quarantine, assignments.
-- Unsigned protocol integers are stored in bigint (u32 fits; seq is checked to fit).
-- Device ids sort by bytes (COLLATE "C"), as in the embedded store.

CREATE TABLE events (
    device      text COLLATE "C" NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    recorded_ms bigint NOT NULL,
    kind        text   NOT NULL,
    body        bytea  NOT NULL,          -- postcard(Event)
    PRIMARY KEY (device, epoch, seq)      -- the dedup key
);

CREATE TABLE devices (
    id            text COLLATE "C" PRIMARY KEY,
    first_seen_ms bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    epoch         bigint NOT NULL,
    health_ms     bigint,
    health        bytea                   -- postcard(Health), newest by capture time
);

CREATE TABLE blobs (
    sha256 bytea PRIMARY KEY,
    data   bytea NOT NULL
);

CREATE TABLE blob_parts (
    sha256 bytea  NOT NULL,
    off    bigint NOT NULL,
    data   bytea  NOT NULL,
    PRIMARY KEY (sha256, off)
);

CREATE TABLE quarantine (
    id          bigserial PRIMARY KEY,
    device      text   NOT NULL,
    topic       text   NOT NULL,
    recorded_ms bigint NOT NULL,
    error       text   NOT NULL,
    raw         bytea  NOT NULL
);
CREATE INDEX quarantine_by_device ON quarantine (device, id);

CREATE TABLE assignments (
    device text COLLATE "C" PRIMARY KEY,
    record bytea  NOT NULL                -- postcard(AssignmentRecord)
);
