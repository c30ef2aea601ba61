//! Schema migrations, embedded in the binary and applied at start (or alone with
//! `fleetsync-hub store migrate`).
//!
//! Each migration is `migrations/NNNN_name.sql`, applied once, in order, in one
//! transaction together with its row in `fleetsync_schema`. The whole check-and-apply runs
//! under a transaction-scoped advisory lock, so hubs starting together migrate once. A
//! database whose schema is newer than [`SCHEMA_VERSION`] is refused: an older hub must
//! not write into tables it does not know.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The migrations this hub knows, in order.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_blob_uploads.sql")),
    (3, include_str!("migrations/0003_credentials.sql")),
    (4, include_str!("migrations/0004_shipments.sql")),
    (5, include_str!("migrations/0005_positions.sql")),
    (6, include_str!("migrations/0006_outbox.sql")),
    (7, include_str!("migrations/0007_webhooks.sql")),
    (8, include_str!("migrations/0008_outbox_leases_hot.sql")),
];

/// The schema version this hub writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Advisory lock key held while migrating ("fleetsyn" in ASCII).
const MIGRATION_LOCK: i64 = 0x666c_6565_7473_796e;

/// Why migrating failed.
#[derive(Debug)]
pub(super) enum MigrateError {
    /// The database said no.
    Pg(tokio_postgres::Error),
    /// The schema is from the future.
    Store(StoreError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Pg(e)
    }
}

/// The highest migration applied, `None` on an empty database.
pub(super) async fn current(client: &Client) -> Result<Option<i64>, MigrateError> {
    let exists = client
        .query_one("SELECT to_regclass('fleetsync_schema') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_one("SELECT max(version) FROM fleetsync_schema", &[])
        .await?
        .get(0))
}

/// Refuses a database this hub cannot use.
pub(super) fn check(version: Option<i64>, target: &str) -> Result<(), StoreError> {
    match version {
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::Config(format!(
            "store.url {target}: the database schema is version {v}, newer than this hub knows ({SCHEMA_VERSION}); run a newer fleetsync-hub"
        ))),
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        other => Err(StoreError::Config(format!(
            "store.url {target}: the database schema is version {}, this hub needs {SCHEMA_VERSION}; run `fleetsync-hub store migrate --config FILE`",
            other.unwrap_or(0)
        ))),
    }
}

/// Applies every migration the database lacks; returns the version it is at now.
pub(super) async fn apply(client: &mut Client) -> Result<i64, MigrateError> {
    // A current database needs no lock and no CREATE right: a role that may only read and
    // write the hub's tables runs a hub on a database someone else migrated.
    if current(client).await? == Some(SCHEMA_VERSION) {
        return Ok(SCHEMA_VERSION);
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fleetsync_schema (\
           version bigint PRIMARY KEY, \
           applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let have: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fleetsync_schema",
            &[],
        )
        .await?
        .get(0);
    if have > SCHEMA_VERSION {
        return Err(MigrateError::Store(StoreError::Config(format!(
            "the database schema is version {have}, newer than this hub knows ({SCHEMA_VERSION}); run a newer fleetsync-hub"
        ))));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO fleetsync_schema (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "store migration applied");
    }
    tx.commit().await?;
    Ok(SCHEMA_VERSION)
}
