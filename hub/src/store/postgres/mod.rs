//! The PostgreSQL backend: several hub processes on one database.
//!
//! ```text
//! events      (device, epoch, seq) PRIMARY KEY, recorded_ms, kind, body = postcard(Event)
//! devices     id PRIMARY KEY, first/last_seen_ms, epoch, health_ms, health = postcard(Health)
//! blobs       sha256 PRIMARY KEY, data
//! blob_uploads (device, sha256) PRIMARY KEY, total_len, stored, updated_ms   in progress
//! blob_parts  (device, sha256, off) PRIMARY KEY, data     cascade-deleted with the upload
//! quarantine  id bigserial, device, topic, recorded_ms, error, raw
//! assignments device PRIMARY KEY, record = postcard(AssignmentRecord)
//! credentials id PRIMARY KEY, role, name, customer_id, token_sha256 UNIQUE, created_ms
//! shipments   id PRIMARY KEY, rev, customer_id, vehicle, state, finished, updated_ms, record (JSON)
//! shipment_facts (shipment_id, fact_id) PRIMARY KEY, fact (JSON)
//! locations   id PRIMARY KEY, fence (JSON)   the ERP's location ids
//! fleetsync_schema  version: the migrations applied (migrations/NNNN_*.sql)
//! ```
//!
//! One ingest round is one transaction with a fixed number of statements whatever its
//! size: the round's events go in one `INSERT ... SELECT FROM UNNEST(arrays) ON CONFLICT DO
//! NOTHING RETURNING` (the unique key is the dedup, also across hub processes: a second
//! hub's insert of the same key waits for the first's commit and then does nothing), one
//! `SELECT` classifies the keys that were not new (same content: duplicate; other content:
//! conflict), one upsert merges every device record (maxima only, so a retried round is
//! harmless). Acks are sent only after `COMMIT` returned.
//!
//! Locks are taken in one order in every round (events by key, assignments by device,
//! blobs by digest, devices by id), so two hubs' rounds do not deadlock on each other; a
//! deadlock or serialization failure PostgreSQL reports anyway is retried
//! ([`MAX_RETRIES`]), anything else fails the round (nothing acked, devices resend).
//!
//! Blobs (POD signatures and photos, at most 32 MiB) live in PostgreSQL as `bytea`: every
//! hub process must serve every blob and assemble chunks that arrive through any of
//! them, so they belong in the one store all processes share, in the same transaction as
//! the round that completes them. A per-device advisory lock (taken in device order,
//! before any row lock of the round's later statements) makes the device's upload budget
//! and the "last chunk completes the blob" check exact across processes; the sweep of
//! idle uploads takes the same lock. Two devices completing the same blob both insert it
//! (`ON CONFLICT DO NOTHING`); when their rounds also hold each other's device locks
//! the second insert's wait can close a cycle, which PostgreSQL reports as a deadlock
//! and the round is retried.
//!
//! Sequence numbers above `i64::MAX` (no agent counts that far) cannot be stored and are
//! counted as conflicts.
//!
//! What the portal's stream shows (a shipment record, a vehicle's position) changes in a
//! transaction that also sends `NOTIFY fleetsync_portal` (no payload: PostgreSQL sends
//! it once per transaction, at commit, to every session listening). Each hub keeps one
//! connection of its own (outside the pool) with `LISTEN fleetsync_portal` while its
//! portal feed runs ([`PgStore::listen_portal`]) and bumps its portal signal on every
//! notification, so a change committed through any hub wakes every hub's feed. The
//! committing hub bumps its own signal after `COMMIT` too. Losing the listening
//! connection loses no change: the feed polls every `[portal] poll_ms` anyway, and the
//! connection is made again with a backoff.

mod migrations;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use fleetsync_protocol::{Assignment, Body, Event, Health, Sha256};
use sha2::Digest as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Transaction};

pub use migrations::SCHEMA_VERSION;

use super::{
    AssignmentRecord, ChunkOutcome, DeviceRecord, EventRows, Ingested, Item, MAX_QUARANTINE,
    MAX_QUARANTINE_PER_DEVICE, MAX_QUARANTINE_RAW, Outcome, PartialBlobLimits, PutShipment,
    QUARANTINE_HEAD, QuarantineEntry, ShipmentQuery, StoreError, StoredEvent, SweepReport,
    UploadRecord, assemble, chunk_invalid, uploads_to_evict,
};
use crate::auth::{Credential, Role};
use crate::config::StoreConfig;
use crate::outbox::webhooks::{self, Subscription};
use crate::outbox::{self, DeadLetter, Delivery, OutboxRow, Settled};
use crate::shipments::correlate::{self, ReviewItem, ReviewStatus};
use crate::shipments::eta::{self, VehiclePosition};
use crate::shipments::{Fact, ShipmentRecord};
use fleetsync_protocol::Fence;

/// Times a round is retried after a deadlock or serialization failure.
const MAX_RETRIES: usize = 5;
/// Longest wait for a connection (from the pool or a new one).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock the webhook fan-out holds (one hub at a time).
const FANOUT_LOCK: i64 = 0x666c_6565_7477_6831; // "fleetwh1"

/// Sent in a transaction that changes what the portal's stream shows.
const NOTIFY_PORTAL: &str = "NOTIFY fleetsync_portal";
/// Run on the listening connection.
const LISTEN_PORTAL: &str = "LISTEN fleetsync_portal";
/// Longest wait before the listening connection is made again after it failed.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(30);

/// The hub's PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    partial_limits: PartialBlobLimits,
    outbox_sinks: std::sync::Arc<Vec<String>>,
    /// Bumped once a write of this process that added outbox rows has committed.
    outbox_signal: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Bumped once a change the portal shows has committed (this process, or any other
    /// while [`PgStore::listen_portal`] runs).
    portal_signal: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// How to connect, for the listening connection (outside the pool).
    config: std::sync::Arc<tokio_postgres::Config>,
    /// host:port/database, for messages (never the password).
    target: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish()
    }
}

/// Where a URL points, without credentials.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres")
    )
}

/// Sorts a driver error into what an operator must fix, what passes, and the rest.
fn classify(e: &tokio_postgres::Error, target: &str) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let config = [
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
            // Tables of the hub's names but no schema record: not a database for the hub.
            SqlState::DUPLICATE_TABLE,
        ];
        if config.contains(code) {
            return StoreError::Config(format!(
                "store.url {target}: {} (SQLSTATE {})",
                db.message(),
                code.code()
            ));
        }
        let transient = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::QUERY_CANCELED,
            SqlState::TOO_MANY_CONNECTIONS,
        ];
        if transient.contains(code) {
            return StoreError::Unavailable(format!("{target}: {}", db.message()));
        }
        return StoreError::Postgres(format!("{} (SQLSTATE {})", db.message(), code.code()));
    }
    let text = match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    // Said by the client before any query: the URL or the credentials are wrong, or the
    // URL asks for TLS, which this hub does not speak to PostgreSQL yet.
    if text.starts_with("invalid configuration")
        || text.starts_with("authentication error")
        || text.contains("TLS")
    {
        return StoreError::Config(format!("store.url {target}: {text}"));
    }
    // No answer from the server: refused, reset, closed, timed out.
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed()
        || io
        || text.starts_with("error connecting")
        || text.starts_with("error communicating")
        || text.starts_with("timeout")
    {
        return StoreError::Unavailable(format!("{target}: {text}"));
    }
    StoreError::Postgres(text)
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

fn to_i64(v: u64) -> Option<i64> {
    i64::try_from(v).ok()
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// The advisory lock key of a device's blob uploads: the first 8 bytes of
/// sha256("blob-uploads" ++ 0 ++ device).
fn uploads_lock(device: &str) -> i64 {
    let mut h = sha2::Sha256::new();
    h.update(b"blob-uploads\0");
    h.update(device.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

fn credential_row(r: &tokio_postgres::Row) -> Result<Credential, StoreError> {
    let role = match r.get::<_, &str>(1) {
        "erp" => Role::Erp,
        "operator" => Role::Operator,
        "customer" => Role::Customer,
        other => {
            return Err(StoreError::Postgres(format!(
                "unknown credential role {other:?}"
            )));
        }
    };
    Ok(Credential {
        id: r.get(0),
        role,
        name: r.get(2),
        customer_id: r.get(3),
        token_sha256: <[u8; 32]>::try_from(r.get::<_, &[u8]>(4)).map_err(|_| {
            StoreError::Postgres("a credential's token digest is not 32 bytes".into())
        })?,
        created_ms: to_u64(r.get(5)),
    })
}

/// A round's events, encoded, sorted by key, one row per distinct key.
struct Rows {
    device: Vec<String>,
    epoch: Vec<i64>,
    seq: Vec<i64>,
    kind: Vec<String>,
    body: Vec<Vec<u8>>,
    /// For each batch item (by item index) and event: the row index, or `None` if the seq
    /// cannot be stored.
    index: HashMap<usize, Vec<Option<usize>>>,
}

impl Rows {
    fn new(items: &[Item]) -> Result<Rows, StoreError> {
        let mut keyed: BTreeMap<(&str, u32, u64), Vec<u8>> = BTreeMap::new();
        for item in items {
            if let Item::Batch { device, batch } = item {
                for (i, ev) in batch.events.iter().enumerate() {
                    let seq = batch.first_seq.wrapping_add(i as u64);
                    if to_i64(seq).is_none() || seq < batch.first_seq {
                        continue;
                    }
                    if let std::collections::btree_map::Entry::Vacant(v) =
                        keyed.entry((device.as_str(), batch.epoch, seq))
                    {
                        v.insert(postcard::to_stdvec(ev)?);
                    }
                }
            }
        }
        let mut rows = Rows {
            device: Vec::with_capacity(keyed.len()),
            epoch: Vec::with_capacity(keyed.len()),
            seq: Vec::with_capacity(keyed.len()),
            kind: Vec::with_capacity(keyed.len()),
            body: Vec::with_capacity(keyed.len()),
            index: HashMap::new(),
        };
        let mut pos: HashMap<(&str, u32, u64), usize> = HashMap::with_capacity(keyed.len());
        for (n, ((d, e, s), body)) in keyed.into_iter().enumerate() {
            pos.insert((d, e, s), n);
            rows.device.push(d.to_string());
            rows.epoch.push(i64::from(e));
            rows.seq.push(s as i64);
            rows.body.push(body);
            rows.kind.push(String::new());
        }
        for (idx, item) in items.iter().enumerate() {
            if let Item::Batch { device, batch } = item {
                let mut v = Vec::with_capacity(batch.events.len());
                for (i, ev) in batch.events.iter().enumerate() {
                    let seq = batch.first_seq.wrapping_add(i as u64);
                    let p = pos.get(&(device.as_str(), batch.epoch, seq)).copied();
                    // The row holds the first delivery of a key in the round: its kind.
                    if let Some(p) = p
                        && rows.kind[p].is_empty()
                    {
                        rows.kind[p] = ev.body.kind().to_string();
                    }
                    v.push(p);
                }
                rows.index.insert(idx, v);
            }
        }
        Ok(rows)
    }
}

impl PgStore {
    /// Connects to `url`, checks the schema and applies pending migrations.
    pub async fn open(url: &str, cfg: &StoreConfig, migrate: bool) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Config(format!(
                "store.url: not a PostgreSQL URL ({e}); expected postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        let target = describe(&pg);
        pg.application_name("fleetsync-hub");
        pg.connect_timeout(CONNECT_TIMEOUT);
        // An ack is only as durable as the commit: never let a server default of
        // synchronous_commit = off decide that.
        pg.options(format!(
            "-c statement_timeout={} -c synchronous_commit=on",
            cfg.statement_timeout_ms
        ));
        let mgr = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Config(format!("store: {e}")))?;
        let store = PgStore {
            pool,
            target,
            partial_limits: cfg.partial_blob_limits(),
            outbox_sinks: std::sync::Arc::new(cfg.outbox_sinks.clone()),
            outbox_signal: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            portal_signal: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            config: std::sync::Arc::new(pg),
        };
        let mut client = store.client().await?;
        if migrate {
            migrations::apply(&mut client)
                .await
                .map_err(|e| store.err(e))?;
        }
        let version = migrations::current(&client)
            .await
            .map_err(|e| store.err(e))?;
        migrations::check(version, &store.target)?;
        Ok(store)
    }

    /// The schema version of the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        migrations::current(&client)
            .await
            .map(|v| v.unwrap_or(0))
            .map_err(|e| self.err(e))
    }

    fn err(&self, e: migrations::MigrateError) -> StoreError {
        match e {
            migrations::MigrateError::Pg(e) => classify(&e, &self.target),
            migrations::MigrateError::Store(e) => e,
        }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => classify(&e, &self.target),
            other => StoreError::Unavailable(format!("{}: {other}", self.target)),
        })
    }

    fn pg(&self, e: tokio_postgres::Error) -> StoreError {
        classify(&e, &self.target)
    }

    /// See [`super::Store::ingest`].
    pub async fn ingest(
        &self,
        items: Vec<Item>,
        recorded_ms: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        let rows = Rows::new(&items)?;
        let recorded = to_i64(recorded_ms).unwrap_or(i64::MAX);
        let mut attempt = 0;
        loop {
            let mut client = self.client().await?;
            let pushed = AtomicBool::new(false);
            let portal = AtomicBool::new(false);
            let round = ingest_round(
                &mut client,
                &items,
                &rows,
                recorded,
                &self.partial_limits,
                &self.outbox_sinks,
                (&pushed, &portal),
            );
            match round.await {
                Ok(Ok(out)) => {
                    if pushed.load(Ordering::Relaxed) {
                        self.signal_outbox();
                    }
                    if portal.load(Ordering::Relaxed) {
                        self.signal_portal();
                    }
                    return Ok(out);
                }
                Ok(Err(e)) => return Err(e),
                Err(e) if retryable(&e) && attempt < MAX_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "ingest round retried");
                }
                Err(e) => return Err(self.pg(e)),
            }
        }
    }

    /// See [`super::Store::devices`].
    pub async fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, first_seen_ms, last_seen_ms, epoch, health_ms, health FROM devices ORDER BY id",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        rows.iter()
            .map(|r| Ok((r.get(0), device_row(r)?)))
            .collect()
    }

    /// See [`super::Store::device`].
    pub async fn device(&self, device: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, first_seen_ms, last_seen_ms, epoch, health_ms, health FROM devices WHERE id = $1",
                &[&device],
            )
            .await
            .map_err(|e| self.pg(e))?;
        row.as_ref().map(device_row).transpose()
    }

    /// See [`super::Store::events`].
    pub async fn events(
        &self,
        device: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<EventRows, StoreError> {
        let (e, s) = match after {
            Some((e, s)) => (i64::from(e), to_i64(s).unwrap_or(i64::MAX)),
            None => (-1, -1),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT epoch, seq, recorded_ms, body FROM events \
                 WHERE device = $1 AND (epoch, seq) > ($2, $3) AND ($4::text IS NULL OR kind = $4) \
                 ORDER BY epoch, seq LIMIT $5",
                &[&device, &e, &s, &kind, &limit],
            )
            .await
            .map_err(|e| self.pg(e))?;
        rows.iter()
            .map(|r| {
                let body: &[u8] = r.get(3);
                Ok((
                    to_u32(r.get(0)),
                    to_u64(r.get(1)),
                    StoredEvent {
                        recorded_ms: to_u64(r.get(2)),
                        event: postcard::from_bytes::<Event>(body)?,
                    },
                ))
            })
            .collect()
    }

    /// See [`super::Store::blob`].
    pub async fn blob(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT data FROM blobs WHERE sha256 = $1", &[&&sha256[..]])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// See [`super::Store::put_credential`].
    pub async fn put_credential(&self, c: &Credential) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO credentials (id, role, name, customer_id, token_sha256, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &c.id,
                    &c.role.as_str(),
                    &c.name,
                    &c.customer_id,
                    &&c.token_sha256[..],
                    &to_i64(c.created_ms).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// See [`super::Store::credential_by_token`].
    pub async fn credential_by_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<Credential>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, role, name, customer_id, token_sha256, created_ms FROM credentials WHERE token_sha256 = $1",
                &[&&token_sha256[..]],
            )
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| credential_row(&r)).transpose()
    }

    /// See [`super::Store::credentials`].
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, role, name, customer_id, token_sha256, created_ms FROM credentials ORDER BY id",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        rows.iter().map(credential_row).collect()
    }

    /// See [`super::Store::delete_credential`].
    pub async fn delete_credential(&self, id: &str) -> Result<Option<Credential>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM credentials WHERE id = $1 \
                 RETURNING id, role, name, customer_id, token_sha256, created_ms",
                &[&id],
            )
            .await
            .map_err(|e| self.pg(e))?;
        row.map(|r| credential_row(&r)).transpose()
    }

    /// See [`super::Store::put_shipment`]: one transaction, the record's row locked (or
    /// its absence asserted by the insert) before anything is written.
    pub async fn put_shipment(
        &self,
        rec: &ShipmentRecord,
        expected_rev: Option<u64>,
        facts: &[Fact],
        locations: &[(String, Fence)],
    ) -> Result<PutShipment, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let json = serde_json::to_string(rec)?;
        let rev = to_i64(rec.rev).unwrap_or(i64::MAX);
        let updated = to_i64(rec.updated_ms).unwrap_or(i64::MAX);
        let (state, finished) = (rec.state.as_str(), rec.state.is_finished());
        match expected_rev {
            None => {
                let n = tx
                    .execute(
                        "INSERT INTO shipments (id, rev, customer_id, vehicle, state, finished, updated_ms, record) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                        &[&rec.id, &rev, &rec.spec.customer_id, &rec.vehicle, &state, &finished, &updated, &json],
                    )
                    .await
                    .map_err(|e| self.pg(e))?;
                if n == 0 {
                    return Ok(PutShipment::Stale);
                }
            }
            Some(expected) => {
                let n = tx
                    .execute(
                        "UPDATE shipments SET rev = $2, customer_id = $3, vehicle = $4, state = $5, \
                         finished = $6, updated_ms = $7, record = $8 WHERE id = $1 AND rev = $9",
                        &[
                            &rec.id,
                            &rev,
                            &rec.spec.customer_id,
                            &rec.vehicle,
                            &state,
                            &finished,
                            &updated,
                            &json,
                            &to_i64(expected).unwrap_or(i64::MAX),
                        ],
                    )
                    .await
                    .map_err(|e| self.pg(e))?;
                if n == 0 {
                    return Ok(PutShipment::Stale);
                }
            }
        }
        let mut sorted: Vec<&(String, Fence)> = locations.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, fence) in sorted {
            let text = serde_json::to_string(fence)?;
            tx.execute(
                "INSERT INTO locations (id, fence) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[id, &text],
            )
            .await
            .map_err(|e| self.pg(e))?;
            let row = tx
                .query_one("SELECT fence FROM locations WHERE id = $1", &[id])
                .await
                .map_err(|e| self.pg(e))?;
            let known: Fence = serde_json::from_str(row.get::<_, &str>(0))?;
            if known != *fence {
                // Dropping the transaction rolls the record back too.
                return Ok(PutShipment::LocationConflict {
                    stop_id: id.clone(),
                });
            }
        }
        let mut new = Vec::new();
        for f in facts {
            let n = tx
                .execute(
                    "INSERT INTO shipment_facts (shipment_id, fact_id, fact) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&rec.id, &f.id, &serde_json::to_string(f)?],
                )
                .await
                .map_err(|e| self.pg(e))?;
            if n == 1 {
                new.push(f.clone());
            }
        }
        let rows = outbox::rows_for(&self.outbox_sinks, rec, &new, rec.updated_ms);
        insert_outbox(&tx, &rows).await.map_err(|e| self.pg(e))??;
        let pushed = !rows.is_empty();
        let stops: Vec<&str> = rec.spec.stops.iter().map(|s| s.id.as_str()).collect();
        tx.execute(
            "INSERT INTO shipment_stops (stop_id, shipment_id) SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING",
            &[&stops, &rec.id],
        )
        .await
        .map_err(|e| self.pg(e))?;
        tx.batch_execute(NOTIFY_PORTAL)
            .await
            .map_err(|e| self.pg(e))?;
        tx.commit().await.map_err(|e| self.pg(e))?;
        if pushed {
            self.signal_outbox();
        }
        self.signal_portal();
        Ok(PutShipment::Written)
    }

    /// See [`super::Store::shipment`].
    pub async fn shipment(
        &self,
        id: &str,
    ) -> Result<Option<(ShipmentRecord, Vec<Fact>)>, StoreError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt("SELECT record FROM shipments WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.pg(e))?
        else {
            return Ok(None);
        };
        let rec: ShipmentRecord = serde_json::from_str(row.get::<_, &str>(0))?;
        let facts = client
            .query(
                "SELECT fact FROM shipment_facts WHERE shipment_id = $1",
                &[&id],
            )
            .await
            .map_err(|e| self.pg(e))?
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)))
            .collect::<Result<Vec<Fact>, _>>()?;
        Ok(Some((rec, facts)))
    }

    /// See [`super::Store::shipments`].
    pub async fn shipments(&self, q: &ShipmentQuery) -> Result<Vec<ShipmentRecord>, StoreError> {
        let client = self.client().await?;
        let (after_ms, after_id) = match &q.after {
            Some((t, id)) => (to_i64(*t).unwrap_or(i64::MAX), id.clone()),
            None => (-1, String::new()),
        };
        let rows = client
            .query(
                "SELECT record FROM shipments \
                 WHERE ($1::text IS NULL OR state = $1) \
                   AND ($2::int8 IS NULL OR updated_ms > $2) \
                   AND ($3::text IS NULL OR customer_id = $3) \
                   AND (updated_ms, id) > ($4, $5) \
                 ORDER BY updated_ms, id LIMIT $6",
                &[
                    &q.state.map(|s| s.as_str()),
                    &q.updated_after.and_then(to_i64),
                    &q.customer_id,
                    &after_ms,
                    &after_id,
                    &(q.limit as i64),
                ],
            )
            .await
            .map_err(|e| self.pg(e))?;
        json_rows::<ShipmentRecord>(&rows)
    }

    /// See [`super::Store::vehicles_shipments`]: records and facts in one query.
    pub async fn vehicles_shipments(
        &self,
        vehicles: &[String],
    ) -> Result<BTreeMap<String, Vec<(ShipmentRecord, Vec<Fact>)>>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT s.id, s.record, f.fact FROM shipments s \
                 LEFT JOIN shipment_facts f ON f.shipment_id = s.id \
                 WHERE s.vehicle = ANY($1) AND NOT s.finished ORDER BY s.id",
                &[&vehicles],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let mut all: Vec<(ShipmentRecord, Vec<Fact>)> = Vec::new();
        for r in &rows {
            let id: &str = r.get(0);
            if all.last().is_none_or(|(rec, _)| rec.id != id) {
                all.push((serde_json::from_str(r.get::<_, &str>(1))?, Vec::new()));
            }
            if let (Some(fact), Some((_, facts))) = (r.get::<_, Option<&str>>(2), all.last_mut()) {
                facts.push(serde_json::from_str(fact)?);
            }
        }
        let mut out: BTreeMap<String, Vec<(ShipmentRecord, Vec<Fact>)>> = BTreeMap::new();
        for (rec, facts) in all {
            if let Some(v) = rec.vehicle.clone() {
                out.entry(v).or_default().push((rec, facts));
            }
        }
        Ok(out)
    }

    /// See [`super::Store::shipment_vehicles`].
    pub async fn shipment_vehicles(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT DISTINCT vehicle FROM shipments WHERE vehicle IS NOT NULL ORDER BY vehicle",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// See [`super::Store::reviews`].
    pub async fn reviews(
        &self,
        status: Option<ReviewStatus>,
        limit: usize,
    ) -> Result<Vec<ReviewItem>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM reviews WHERE ($1::text IS NULL OR status = $1) \
                 ORDER BY created_ms, id LIMIT $2",
                &[&status.map(|s| s.as_str()), &(limit as i64)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        json_rows::<ReviewItem>(&rows)
    }

    /// See [`super::Store::reviews_of`].
    pub async fn reviews_of(&self, shipment: &str) -> Result<Vec<ReviewItem>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT record FROM reviews WHERE shipment_id = $1 ORDER BY created_ms, id",
                &[&shipment],
            )
            .await
            .map_err(|e| self.pg(e))?;
        json_rows::<ReviewItem>(&rows)
    }

    /// See [`super::Store::positions`].
    pub async fn positions(
        &self,
        devices: &[String],
    ) -> Result<BTreeMap<String, VehiclePosition>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device, record FROM positions WHERE device = ANY($1)",
                &[&devices],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let mut out = BTreeMap::new();
        for r in &rows {
            out.insert(r.get(0), postcard::from_bytes(r.get::<_, &[u8]>(1))?);
        }
        Ok(out)
    }

    /// See [`super::Store::outbox_pending`].
    pub async fn outbox_pending(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, row FROM outbox WHERE sink = $1 ORDER BY seq LIMIT $2",
                &[&sink, &(limit as i64)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row: OutboxRow = serde_json::from_str(r.get::<_, &str>(1))?;
            row.seq = to_u64(r.get(0));
            out.push(row);
        }
        Ok(out)
    }

    /// See [`super::Store::outbox_due`]: the first row of each shipment that is due and
    /// not leased by another hub, oldest first, leased now until `lease_until`.
    ///
    /// The heads are found by a skip scan of `outbox_by_shipment`: one index descent per
    /// shipment with rows waiting (`heads`), whatever their number of rows. (Walking
    /// the sink's rows in seq order and asking of each whether an earlier row of its
    /// shipment exists costs a probe per row up to the `limit`th head, and a probe per
    /// row of the sink when fewer are due: 100,000 probes, 0.7-1.4 s, for a sink whose
    /// 2,000 heads are all leased.) The locking step then takes the oldest `limit` of
    /// those still due and unleased with `FOR UPDATE SKIP LOCKED`, rechecked on the
    /// row's newest version, so a row another hub leased or settled meanwhile is left
    /// out; the limit applies after the lock, so heads another hub is leasing at that
    /// moment do not shrink this batch. A head cannot stop being its shipment's head:
    /// rows are only ever added after it (higher seq).
    pub async fn outbox_due(
        &self,
        sink: &str,
        now_ms: u64,
        lease_until: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let client = self.client().await?;
        let now = to_i64(now_ms).unwrap_or(i64::MAX);
        let until = to_i64(lease_until).unwrap_or(i64::MAX);
        let stmt = client
            .prepare_cached(
                "WITH RECURSIVE heads AS ( \
                     (SELECT o.shipment_id, o.seq, o.next_ms, o.lease_until FROM outbox o \
                      WHERE o.sink = $1 ORDER BY o.shipment_id, o.seq LIMIT 1) \
                   UNION ALL \
                     SELECT n.shipment_id, n.seq, n.next_ms, n.lease_until FROM heads h, \
                       LATERAL (SELECT o.shipment_id, o.seq, o.next_ms, o.lease_until \
                                FROM outbox o \
                                WHERE o.sink = $1 AND o.shipment_id > h.shipment_id \
                                ORDER BY o.shipment_id, o.seq LIMIT 1) n) \
                 UPDATE outbox SET lease_until = $3 WHERE seq IN ( \
                   SELECT o.seq FROM outbox o \
                   WHERE o.seq IN (SELECT seq FROM heads \
                                   WHERE next_ms <= $2 AND lease_until <= $2) \
                     AND o.next_ms <= $2 AND o.lease_until <= $2 \
                   ORDER BY o.seq LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING seq, row",
            )
            .await
            .map_err(|e| self.pg(e))?;
        let rows = client
            .query(&stmt, &[&sink, &now, &until, &(limit as i64)])
            .await
            .map_err(|e| self.pg(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut row: OutboxRow = serde_json::from_str(r.get::<_, &str>(1))?;
            row.seq = to_u64(r.get(0));
            out.push(row);
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    /// See [`super::Store::outbox_settle`]: one transaction.
    pub async fn outbox_settle(
        &self,
        results: Vec<(OutboxRow, Delivery)>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        // Delivered rows (the common case) go in two statements for the whole batch.
        let mut gone: Vec<i64> = Vec::new();
        let (mut kept_seq, mut kept_id, mut kept_sink, mut kept_created, mut kept_row) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (row, d) in results {
            let seq = to_i64(row.seq).unwrap_or(i64::MAX);
            let keep = webhooks::is_subscription_sink(&row.sink).then(|| row.clone());
            match row.settle(d, now_ms) {
                Settled::Gone => {
                    gone.push(seq);
                    if let Some(row) = keep {
                        kept_seq.push(seq);
                        kept_created.push(to_i64(row.created_ms).unwrap_or(i64::MAX));
                        kept_row.push(serde_json::to_string(&row)?);
                        kept_id.push(row.id);
                        kept_sink.push(row.sink);
                    }
                }
                Settled::Waiting(row) => {
                    tx.execute(
                        "UPDATE outbox SET next_ms = $2, lease_until = 0, row = $3 WHERE seq = $1",
                        &[
                            &seq,
                            &to_i64(row.next_ms).unwrap_or(i64::MAX),
                            &serde_json::to_string(&row)?,
                        ],
                    )
                    .await
                    .map_err(|e| self.pg(e))?;
                }
                Settled::Dead(dead) => {
                    tx.execute(
                        "INSERT INTO deadletters (id, sink, shipment_id, dead_ms, letter) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (id) DO UPDATE SET dead_ms = EXCLUDED.dead_ms, letter = EXCLUDED.letter",
                        &[
                            &dead.row.id,
                            &dead.row.sink,
                            &dead.row.shipment_id,
                            &to_i64(now_ms).unwrap_or(i64::MAX),
                            &serde_json::to_string(&dead)?,
                        ],
                    )
                    .await
                    .map_err(|e| self.pg(e))?;
                    tx.execute("DELETE FROM outbox WHERE seq = $1", &[&seq])
                        .await
                        .map_err(|e| self.pg(e))?;
                }
            }
        }
        tx.execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&gone])
            .await
            .map_err(|e| self.pg(e))?;
        if !kept_seq.is_empty() {
            tx.execute(
                "INSERT INTO outbox_sent (seq, id, sink, created_ms, row) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[]) \
                 ON CONFLICT DO NOTHING",
                &[&kept_seq, &kept_id, &kept_sink, &kept_created, &kept_row],
            )
            .await
            .map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// See [`super::Store::outbox_depth`].
    pub async fn outbox_depth(&self, sink: &str) -> Result<(u64, Option<u64>), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), min(seq) FROM outbox WHERE sink = $1",
                &[&sink],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let oldest = match row.get::<_, Option<i64>>(1) {
            Some(seq) => client
                .query_opt("SELECT row FROM outbox WHERE seq = $1", &[&seq])
                .await
                .map_err(|e| self.pg(e))?
                .map(|r| serde_json::from_str::<OutboxRow>(r.get::<_, &str>(0)))
                .transpose()?
                .map(|r| r.created_ms),
            None => None,
        };
        Ok((to_u64(row.get(0)), oldest))
    }

    /// See [`super::Store::deadletters`].
    pub async fn deadletters(
        &self,
        sink: Option<String>,
        shipment: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT letter FROM deadletters WHERE ($1::text IS NULL OR sink = $1) \
                 AND ($2::text IS NULL OR shipment_id = $2) ORDER BY dead_ms, id LIMIT $3",
                &[&sink, &shipment, &(limit as i64)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        json_rows::<DeadLetter>(&rows)
    }

    /// See [`super::Store::replay_deadletter`].
    pub async fn replay_deadletter(&self, id: &str) -> Result<Option<OutboxRow>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let Some(r) = tx
            .query_opt(
                "DELETE FROM deadletters WHERE id = $1 RETURNING letter",
                &[&id],
            )
            .await
            .map_err(|e| self.pg(e))?
        else {
            return Ok(None);
        };
        let dead: DeadLetter = serde_json::from_str(r.get::<_, &str>(0))?;
        let row = dead.row.replayed();
        // Back at the end of its sink's outbox, under the same id.
        insert_outbox(&tx, std::slice::from_ref(&row))
            .await
            .map_err(|e| self.pg(e))??;
        tx.commit().await.map_err(|e| self.pg(e))?;
        self.signal_outbox();
        Ok(Some(row))
    }

    /// See [`super::Store::outbox_signal`].
    pub fn outbox_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox_signal.subscribe()
    }

    fn signal_outbox(&self) {
        self.outbox_signal.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// See [`super::Store::portal_signal`].
    pub fn portal_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.portal_signal.subscribe()
    }

    fn signal_portal(&self) {
        self.portal_signal.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// See [`super::Store::listen_portal`]: one connection of its own with `LISTEN`,
    /// made again (1 s, doubling to [`MAX_LISTEN_BACKOFF`]) whenever it fails.
    pub async fn listen_portal(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = std::time::Instant::now();
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = self.listen_once() => e,
            };
            if started.elapsed() > MAX_LISTEN_BACKOFF {
                backoff = Duration::from_secs(1);
            }
            tracing::warn!(target = %self.target, error = %why, retry_in_s = backoff.as_secs(),
                "portal: the LISTEN connection failed; other hubs' changes reach this hub's streams by polling until it is back");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
        }
    }

    /// Listens until the connection fails; returns why.
    async fn listen_once(&self) -> StoreError {
        use futures_util::StreamExt as _;
        let mut cfg = (*self.config).clone();
        // A peer that vanishes without a reset is noticed within a minute or so.
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(20))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let (client, mut conn) = match cfg.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => return self.pg(e),
        };
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        let listen = client.batch_execute(LISTEN_PORTAL);
        tokio::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                r = &mut listen, if !listening => match r {
                    Ok(()) => {
                        listening = true;
                        tracing::debug!(target = %self.target, "portal: listening for other hubs' changes");
                        // What committed while nobody listened is read now.
                        self.signal_portal();
                    }
                    Err(e) => return self.pg(e),
                },
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => self.signal_portal(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return self.pg(e),
                    None => {
                        return StoreError::Unavailable(format!("{}: the listening connection closed", self.target));
                    }
                },
            }
        }
    }

    /// See [`super::Store::put_webhook`].
    pub async fn put_webhook(&self, sub: &Subscription) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO webhooks (id, record) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&sub.id, &serde_json::to_string(sub)?],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(())
    }

    /// See [`super::Store::webhook`].
    pub async fn webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM webhooks WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(json_rows::<Subscription>(&rows)?.pop())
    }

    /// See [`super::Store::webhooks`].
    pub async fn webhooks(&self) -> Result<Vec<Subscription>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM webhooks ORDER BY id", &[])
            .await
            .map_err(|e| self.pg(e))?;
        json_rows::<Subscription>(&rows)
    }

    /// See [`super::Store::delete_webhook`].
    pub async fn delete_webhook(&self, id: &str) -> Result<Option<Subscription>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let rows = tx
            .query(
                "DELETE FROM webhooks WHERE id = $1 RETURNING record",
                &[&id],
            )
            .await
            .map_err(|e| self.pg(e))?;
        let Some(sub) = json_rows::<Subscription>(&rows)?.pop() else {
            return Ok(None);
        };
        let sink = webhooks::sink_of(id);
        for sql in [
            "DELETE FROM outbox WHERE sink = $1",
            "DELETE FROM outbox_sent WHERE sink = $1",
            "DELETE FROM deadletters WHERE sink = $1",
        ] {
            tx.execute(sql, &[&sink]).await.map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        Ok(Some(sub))
    }

    /// See [`super::Store::webhook_fanout`]: one hub at a time (a transaction-scoped
    /// advisory lock; a hub that does not get it leaves the rows to the one that has it),
    /// so the subscriptions' rows keep the staging order.
    pub async fn webhook_fanout(
        &self,
        limit: usize,
        event_type: impl Fn(&OutboxRow) -> String + Send + 'static,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&FANOUT_LOCK])
            .await
            .map_err(|e| self.pg(e))?
            .get(0);
        if !locked {
            return Ok(0);
        }
        let staged = tx
            .query(
                "SELECT seq, row FROM outbox WHERE sink = $1 ORDER BY seq LIMIT $2",
                &[&webhooks::STAGING, &(limit as i64)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if staged.is_empty() {
            return Ok(0);
        }
        let subs = json_rows::<Subscription>(
            &tx.query("SELECT record FROM webhooks", &[])
                .await
                .map_err(|e| self.pg(e))?,
        )?;
        let mut rows = Vec::new();
        let mut seqs: Vec<i64> = Vec::with_capacity(staged.len());
        for r in &staged {
            seqs.push(r.get(0));
            let row: OutboxRow = serde_json::from_str(r.get::<_, &str>(1))?;
            rows.extend(webhooks::fan_out(&row, &subs, &event_type(&row)));
        }
        insert_outbox(&tx, &rows).await.map_err(|e| self.pg(e))??;
        tx.execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&seqs])
            .await
            .map_err(|e| self.pg(e))?;
        tx.commit().await.map_err(|e| self.pg(e))?;
        if !rows.is_empty() {
            self.signal_outbox();
        }
        Ok(staged.len())
    }

    /// See [`super::Store::webhook_replay`].
    pub async fn webhook_replay(&self, id: &str, since_ms: u64) -> Result<usize, StoreError> {
        let sink = webhooks::sink_of(id);
        let since = to_i64(since_ms).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let mut rows: Vec<OutboxRow> = Vec::new();
        for r in tx
            .query(
                "DELETE FROM outbox_sent WHERE sink = $1 AND created_ms >= $2 RETURNING row",
                &[&sink, &since],
            )
            .await
            .map_err(|e| self.pg(e))?
        {
            rows.push(serde_json::from_str(r.get::<_, &str>(0))?);
        }
        let letters = json_rows::<DeadLetter>(
            &tx.query("SELECT letter FROM deadletters WHERE sink = $1", &[&sink])
                .await
                .map_err(|e| self.pg(e))?,
        )?;
        let dead: Vec<DeadLetter> = letters
            .into_iter()
            .filter(|d| d.row.created_ms >= since_ms)
            .collect();
        let ids: Vec<&str> = dead.iter().map(|d| d.row.id.as_str()).collect();
        tx.execute("DELETE FROM deadletters WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(|e| self.pg(e))?;
        rows.extend(dead.iter().map(|d| d.row.clone()));
        // In their first order, under the same ids.
        rows.sort_by_key(|r| r.seq);
        let rows: Vec<OutboxRow> = rows.into_iter().map(OutboxRow::replayed).collect();
        insert_outbox(&tx, &rows).await.map_err(|e| self.pg(e))??;
        tx.commit().await.map_err(|e| self.pg(e))?;
        if !rows.is_empty() {
            self.signal_outbox();
        }
        Ok(rows.len())
    }

    /// See [`super::Store::prune_delivered`].
    pub async fn prune_delivered(&self, before_ms: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM outbox_sent WHERE created_ms < $1",
                &[&to_i64(before_ms).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(n)
    }

    /// See [`super::Store::review`].
    pub async fn review(&self, id: &str) -> Result<Option<ReviewItem>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT record FROM reviews WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(row
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)))
            .transpose()?)
    }

    /// See [`super::Store::put_review`].
    pub async fn put_review(
        &self,
        item: &ReviewItem,
        expected: Option<ReviewStatus>,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let text = serde_json::to_string(item)?;
        let created = to_i64(item.created_time.0).unwrap_or(i64::MAX);
        let n = match expected {
            None => client
                .execute(
                    "INSERT INTO reviews (id, status, created_ms, record, shipment_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&item.id, &item.status.as_str(), &created, &text, &item.shipment_id],
                )
                .await,
            Some(old) => client
                .execute(
                    "UPDATE reviews SET status = $2, record = $3 WHERE id = $1 AND status = $4",
                    &[&item.id, &item.status.as_str(), &text, &old.as_str()],
                )
                .await,
        }
        .map_err(|e| self.pg(e))?;
        Ok(n == 1)
    }

    /// See [`super::Store::blob_exists`].
    pub async fn blob_exists(&self, sha256: &Sha256) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT 1 FROM blobs WHERE sha256 = $1", &[&&sha256[..]])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(row.is_some())
    }

    /// See [`super::Store::sweep_partial_blobs`]. Device by device, each under the
    /// device's upload lock (as its chunks are), so a sweep never removes an upload
    /// between a round's reading of it and its writing.
    pub async fn sweep_partial_blobs(&self, now_ms: u64) -> Result<SweepReport, StoreError> {
        let cutoff = to_i64(now_ms.saturating_sub(self.partial_limits.ttl_ms)).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let devices: Vec<String> = client
            .query(
                "SELECT DISTINCT device FROM blob_uploads WHERE updated_ms < $1 ORDER BY device",
                &[&cutoff],
            )
            .await
            .map_err(|e| self.pg(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut expired = 0;
        for d in devices {
            let tx = client.transaction().await.map_err(|e| self.pg(e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&uploads_lock(&d)])
                .await
                .map_err(|e| self.pg(e))?;
            expired += tx
                .execute(
                    "DELETE FROM blob_uploads WHERE device = $1 AND updated_ms < $2",
                    &[&d, &cutoff],
                )
                .await
                .map_err(|e| self.pg(e))?;
            tx.commit().await.map_err(|e| self.pg(e))?;
        }
        let row = client
            .query_one(
                "SELECT count(*), coalesce(sum(stored), 0)::int8 FROM blob_uploads",
                &[],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(SweepReport {
            expired,
            uploads: to_u64(row.get(0)),
            bytes: to_u64(row.get(1)),
        })
    }

    /// See [`super::Store::partial_blob_limits`].
    pub fn partial_blob_limits(&self) -> PartialBlobLimits {
        self.partial_limits
    }

    /// See [`super::Store::quarantined`].
    pub async fn quarantined(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<QuarantineEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let before = before.and_then(to_i64).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, device, topic, recorded_ms, error, length(raw)::int8, substring(raw from 1 for $3) \
                 FROM quarantine WHERE id < $2 ORDER BY id DESC LIMIT $1",
                &[&limit, &before, &(QUARANTINE_HEAD as i32)],
            )
            .await
            .map_err(|e| self.pg(e))?;
        Ok(rows
            .iter()
            .map(|r| QuarantineEntry {
                id: to_u64(r.get(0)),
                device: r.get(1),
                topic: r.get(2),
                recorded_ms: to_u64(r.get(3)),
                error: r.get(4),
                bytes: usize::try_from(r.get::<_, i64>(5)).unwrap_or(0),
                head: r.get(6),
            })
            .collect())
    }

    /// See [`super::Store::quarantined_raw`].
    pub async fn quarantined_raw(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(id) = to_i64(id) else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT raw FROM quarantine WHERE id = $1", &[&id])
            .await
            .map_err(|e| self.pg(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// See [`super::Store::put_assignment`].
    pub async fn put_assignment(
        &self,
        device: &str,
        a: &Assignment,
        now_ms: u64,
    ) -> Result<Result<(), u32>, StoreError> {
        let fresh = postcard::to_stdvec(&AssignmentRecord::new(a, now_ms))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        let inserted = tx
            .query_opt(
                "INSERT INTO assignments (device, record) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING device",
                &[&device, &fresh],
            )
            .await
            .map_err(|e| self.pg(e))?;
        if inserted.is_none() {
            let prev = locked_assignment(&tx, device)
                .await
                .map_err(|e| self.pg(e))?
                .ok_or_else(|| StoreError::Postgres("assignment row vanished".into()))??;
            if prev.assignment.version >= a.version {
                return Ok(Err(prev.assignment.version));
            }
            let rec = postcard::to_stdvec(&AssignmentRecord::new(a, now_ms))?;
            tx.execute(
                "UPDATE assignments SET record = $2 WHERE device = $1",
                &[&device, &rec],
            )
            .await
            .map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))?;
        Ok(Ok(()))
    }

    /// See [`super::Store::assignment`].
    pub async fn assignment(&self, device: &str) -> Result<Option<AssignmentRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM assignments WHERE device = $1",
                &[&device],
            )
            .await
            .map_err(|e| self.pg(e))?;
        match row {
            Some(r) => Ok(Some(postcard::from_bytes(r.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    /// See [`super::Store::assignments`].
    pub async fn assignments(
        &self,
        devices: &[String],
    ) -> Result<Vec<(String, AssignmentRecord)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device, record FROM assignments WHERE device = ANY($1) ORDER BY device",
                &[&devices],
            )
            .await
            .map_err(|e| self.pg(e))?;
        rows.iter()
            .map(|r| Ok((r.get(0), postcard::from_bytes(r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    /// See [`super::Store::mark_assignment_sent`].
    pub async fn mark_assignment_sent(&self, device: &str, now_ms: u64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg(e))?;
        if let Some(rec) = locked_assignment(&tx, device)
            .await
            .map_err(|e| self.pg(e))?
        {
            let mut rec = rec?;
            rec.sent_ms = now_ms;
            tx.execute(
                "UPDATE assignments SET record = $2 WHERE device = $1",
                &[&device, &postcard::to_stdvec(&rec)?],
            )
            .await
            .map_err(|e| self.pg(e))?;
        }
        tx.commit().await.map_err(|e| self.pg(e))
    }

    /// See [`super::Store::ping`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        match tokio::time::timeout(Duration::from_secs(2), client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.pg(e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: no answer to SELECT 1 within 2 s",
                self.target
            ))),
        }
    }
}

fn device_row(r: &tokio_postgres::Row) -> Result<DeviceRecord, StoreError> {
    let health_ms: Option<i64> = r.get(4);
    let health: Option<&[u8]> = r.get(5);
    let last_health = match (health_ms, health) {
        (Some(t), Some(h)) => Some((to_u64(t), postcard::from_bytes::<Health>(h)?)),
        _ => None,
    };
    Ok(DeviceRecord {
        first_seen_ms: to_u64(r.get(1)),
        last_seen_ms: to_u64(r.get(2)),
        epoch: to_u32(r.get(3)),
        last_health,
    })
}

/// The device's assignment record, locked for this transaction.
async fn locked_assignment(
    tx: &Transaction<'_>,
    device: &str,
) -> Result<Option<Result<AssignmentRecord, StoreError>>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT record FROM assignments WHERE device = $1 FOR UPDATE",
            &[&device],
        )
        .await?;
    Ok(row.map(|r| postcard::from_bytes(r.get::<_, &[u8]>(0)).map_err(StoreError::from)))
}

/// Per device: last seen, highest epoch, newest health from the round's new events.
#[derive(Default)]
struct DeviceMerge {
    epoch: Option<u32>,
    health: Option<(u64, Health)>,
}

/// One attempt at a round. The outer `Err` is a driver error (maybe retryable); the inner
/// one a row that did not decode or encode.
async fn ingest_round(
    client: &mut Object,
    items: &[Item],
    rows: &Rows,
    recorded: i64,
    limits: &PartialBlobLimits,
    sinks: &[String],
    (pushed, portal): (&AtomicBool, &AtomicBool),
) -> Result<Result<Vec<Outcome>, StoreError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut new_keys = vec![false; rows.device.len()];
    let mut stored: HashMap<usize, Vec<u8>> = HashMap::new();
    if !rows.device.is_empty() {
        let inserted = tx
            .query(
                "INSERT INTO events (device, epoch, seq, recorded_ms, kind, body) \
                 SELECT d, e, s, $6, k, b FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::bytea[]) AS t(d, e, s, k, b) \
                 ON CONFLICT DO NOTHING RETURNING device, epoch, seq",
                &[&rows.device, &rows.epoch, &rows.seq, &rows.kind, &rows.body, &recorded],
            )
            .await?;
        let mut pos: HashMap<(&str, i64, i64), usize> = HashMap::with_capacity(rows.device.len());
        for i in 0..rows.device.len() {
            pos.insert((rows.device[i].as_str(), rows.epoch[i], rows.seq[i]), i);
        }
        for r in &inserted {
            let (d, e, s): (&str, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if let Some(&i) = pos.get(&(d, e, s)) {
                new_keys[i] = true;
            }
        }
        if inserted.len() < rows.device.len() {
            let (mut d, mut e, mut s) = (Vec::new(), Vec::new(), Vec::new());
            for i in (0..rows.device.len()).filter(|&i| !new_keys[i]) {
                d.push(rows.device[i].as_str());
                e.push(rows.epoch[i]);
                s.push(rows.seq[i]);
            }
            let existing = tx
                .query(
                    "SELECT device, epoch, seq, body FROM events \
                     WHERE (device, epoch, seq) IN (SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[]))",
                    &[&d, &e, &s],
                )
                .await?;
            for r in &existing {
                let (d, e, s): (&str, i64, i64) = (r.get(0), r.get(1), r.get(2));
                if let Some(&i) = pos.get(&(d, e, s)) {
                    stored.insert(i, r.get(3));
                }
            }
        }
    }

    // Classify every event of every batch; gather what new events imply.
    let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
    let mut devices: BTreeMap<&str, DeviceMerge> = BTreeMap::new();
    let mut acks: BTreeMap<&str, Vec<(&str, u32, u64)>> = BTreeMap::new();
    let mut corr: BTreeMap<&str, Vec<(u32, u64, &Event)>> = BTreeMap::new();
    let mut fixes: BTreeMap<&str, Vec<eta::FixAt<'_>>> = BTreeMap::new();
    let mut claimed = vec![false; rows.device.len()];
    for (idx, item) in items.iter().enumerate() {
        match item {
            Item::Batch { device, batch } => {
                let merge = devices.entry(device.as_str()).or_default();
                merge.epoch = Some(merge.epoch.map_or(batch.epoch, |e| e.max(batch.epoch)));
                let mut out = Ingested::default();
                let index = rows.index.get(&idx).map(Vec::as_slice).unwrap_or(&[]);
                for (i, ev) in batch.events.iter().enumerate() {
                    let Some(Some(p)) = index.get(i).copied() else {
                        out.conflicts += 1;
                        continue;
                    };
                    if new_keys[p] && !claimed[p] {
                        claimed[p] = true;
                        out.new.push(batch.first_seq + i as u64);
                        if let Body::AssignmentAck(a) = &ev.body {
                            acks.entry(device.as_str()).or_default().push((
                                a.assignment_id.as_str(),
                                a.version,
                                ev.time_ms,
                            ));
                        }
                        if let Body::Position(f) = &ev.body {
                            fixes.entry(device.as_str()).or_default().push((
                                ev.time_ms,
                                f,
                                batch.epoch,
                                batch.first_seq + i as u64,
                            ));
                        }
                        if correlate::correlates(&ev.body) {
                            corr.entry(device.as_str()).or_default().push((
                                batch.epoch,
                                batch.first_seq + i as u64,
                                ev,
                            ));
                        }
                        if let Body::Health(h) = &ev.body
                            && merge.health.as_ref().is_none_or(|(t, _)| *t <= ev.time_ms)
                        {
                            merge.health = Some((ev.time_ms, h.clone()));
                        }
                        continue;
                    }
                    // Not new: compare with what is stored (or was written by this round).
                    let existing = if new_keys[p] {
                        Some(&rows.body[p])
                    } else {
                        stored.get(&p)
                    };
                    let mine = match postcard::to_stdvec(ev) {
                        Ok(b) => b,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    if existing.is_some_and(|b| *b == mine) {
                        out.duplicates += 1;
                    } else {
                        out.conflicts += 1;
                    }
                }
                outcomes[idx] = Some(Outcome::Batch(out));
            }
            Item::Chunk { device, .. } => {
                devices.entry(device.as_str()).or_default();
            }
            Item::Quarantine(_) => {}
        }
    }

    for (device, list) in &acks {
        let Some(rec) = locked_assignment(&tx, device).await? else {
            continue;
        };
        let mut rec = match rec {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut changed = false;
        for (id, version, time) in list {
            changed |= rec.apply_ack(id, *version, *time);
        }
        if changed {
            let bytes = match postcard::to_stdvec(&rec) {
                Ok(b) => b,
                Err(e) => return Ok(Err(e.into())),
            };
            tx.execute(
                "UPDATE assignments SET record = $2 WHERE device = $1",
                &[device, &bytes],
            )
            .await?;
        }
    }

    // What new trip and POD events mean for the vehicles' shipments (rows locked by
    // device, then shipment id).
    for (device, events) in &corr {
        if let Err(e) = correlate_device(&tx, device, events, recorded, sinks, pushed).await? {
            return Ok(Err(e));
        }
    }

    if !fixes.is_empty()
        && let Err(e) = merge_positions(&tx, &mut fixes, recorded).await?
    {
        return Ok(Err(e));
    }

    // Blob chunks, by device (lock order), then digest and offset.
    let mut chunks: Vec<(usize, &str, &fleetsync_protocol::BlobChunk)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, it)| match it {
            Item::Chunk { device, chunk } => Some((i, device.as_str(), chunk)),
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|(_, d, c)| (*d, c.sha256, c.offset));
    let mut locked: Option<&str> = None;
    for (idx, device, chunk) in chunks {
        if locked != Some(device) {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&uploads_lock(device)])
                .await?;
            locked = Some(device);
        }
        let outcome = put_chunk(&tx, device, chunk, recorded, limits).await?;
        outcomes[idx] = Some(Outcome::Chunk(outcome));
    }

    if !devices.is_empty() {
        let mut ids = Vec::with_capacity(devices.len());
        let mut epochs = Vec::with_capacity(devices.len());
        let mut health_ms: Vec<Option<i64>> = Vec::with_capacity(devices.len());
        let mut health: Vec<Option<Vec<u8>>> = Vec::with_capacity(devices.len());
        for (id, m) in &devices {
            ids.push(*id);
            epochs.push(i64::from(m.epoch.unwrap_or(0)));
            match &m.health {
                Some((t, h)) => {
                    health_ms.push(Some(to_i64(*t).unwrap_or(i64::MAX)));
                    match postcard::to_stdvec(h) {
                        Ok(b) => health.push(Some(b)),
                        Err(e) => return Ok(Err(e.into())),
                    }
                }
                None => {
                    health_ms.push(None);
                    health.push(None);
                }
            }
        }
        tx.execute(
            "INSERT INTO devices (id, first_seen_ms, last_seen_ms, epoch, health_ms, health) \
             SELECT i, $2, $2, e, hm, h FROM UNNEST($1::text[], $3::int8[], $4::int8[], $5::bytea[]) AS t(i, e, hm, h) \
             ON CONFLICT (id) DO UPDATE SET \
               last_seen_ms = GREATEST(devices.last_seen_ms, EXCLUDED.last_seen_ms), \
               epoch = GREATEST(devices.epoch, EXCLUDED.epoch), \
               health = CASE WHEN EXCLUDED.health_ms IS NOT NULL AND (devices.health_ms IS NULL OR devices.health_ms <= EXCLUDED.health_ms) \
                        THEN EXCLUDED.health ELSE devices.health END, \
               health_ms = CASE WHEN EXCLUDED.health_ms IS NOT NULL AND (devices.health_ms IS NULL OR devices.health_ms <= EXCLUDED.health_ms) \
                        THEN EXCLUDED.health_ms ELSE devices.health_ms END",
            &[&ids, &recorded, &epochs, &health_ms, &health],
        )
        .await?;
    }

    let mut quarantined: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (idx, item) in items.iter().enumerate() {
        if let Item::Quarantine(q) = item {
            let raw = &q.raw[..q.raw.len().min(MAX_QUARANTINE_RAW)];
            let row = tx
                .query_one(
                    "INSERT INTO quarantine (device, topic, recorded_ms, error, raw) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[&q.device, &q.topic, &to_i64(q.recorded_ms).unwrap_or(i64::MAX), &q.error, &raw],
                )
                .await?;
            outcomes[idx] = Some(Outcome::Quarantined(to_u64(row.get(0))));
            quarantined.insert(q.device.as_str());
        }
    }
    for device in &quarantined {
        // This device's oldest past its share.
        tx.execute(
            "DELETE FROM quarantine WHERE device = $1 AND id < \
             (SELECT id FROM quarantine WHERE device = $1 ORDER BY id DESC OFFSET $2::int8 LIMIT 1)",
            &[device, &(MAX_QUARANTINE_PER_DEVICE as i64 - 1)],
        )
        .await?;
    }
    if !quarantined.is_empty() {
        let keep = MAX_QUARANTINE as i64;
        tx.execute(
            "DELETE FROM quarantine WHERE id < (SELECT id FROM quarantine ORDER BY id DESC OFFSET $1::int8 LIMIT 1)",
            &[&(keep - 1)],
        )
        .await?;
    }
    // New fixes or trip / POD events: the portal may show something new (at worst a
    // feed reads once for nothing: the fixes were older than the stored position).
    if !fixes.is_empty() || !corr.is_empty() {
        tx.batch_execute(NOTIFY_PORTAL).await?;
        portal.store(true, Ordering::Relaxed);
    }
    tx.commit().await?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Task("an item had no outcome".into())))
        .collect())
}

/// Folds the round's new fixes into each device's newest position
/// ([`eta::fold_position`]), rows locked in device order.
async fn merge_positions(
    tx: &Transaction<'_>,
    fixes: &mut BTreeMap<&str, Vec<eta::FixAt<'_>>>,
    recorded: i64,
) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
    let ids: Vec<&str> = fixes.keys().copied().collect();
    let mut prev: HashMap<String, VehiclePosition> = HashMap::new();
    for r in tx
        .query(
            "SELECT device, record FROM positions WHERE device = ANY($1) ORDER BY device FOR UPDATE",
            &[&ids],
        )
        .await?
    {
        match postcard::from_bytes(r.get::<_, &[u8]>(1)) {
            Ok(p) => prev.insert(r.get(0), p),
            Err(e) => return Ok(Err(e.into())),
        };
    }
    let (mut dev, mut time, mut rec) = (Vec::new(), Vec::new(), Vec::new());
    for (device, list) in fixes.iter_mut() {
        let Some(next) = eta::fold_position(prev.get(*device), list, to_u64(recorded)) else {
            continue;
        };
        match postcard::to_stdvec(&next) {
            Ok(b) => rec.push(b),
            Err(e) => return Ok(Err(e.into())),
        }
        dev.push(*device);
        time.push(to_i64(next.time_ms).unwrap_or(i64::MAX));
    }
    if !dev.is_empty() {
        tx.execute(
            "INSERT INTO positions (device, time_ms, record) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::bytea[]) \
             ON CONFLICT (device) DO UPDATE SET time_ms = EXCLUDED.time_ms, record = EXCLUDED.record",
            &[&dev, &time, &rec],
        )
        .await?;
    }
    Ok(Ok(()))
}

/// Writes the facts and review items `events` of `device` imply, inside the round.
async fn correlate_device(
    tx: &Transaction<'_>,
    device: &str,
    events: &[(u32, u64, &Event)],
    recorded: i64,
    sinks: &[String],
    pushed: &AtomicBool,
) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
    let mut fresh: BTreeMap<String, Vec<Fact>> = BTreeMap::new();
    let mut open: Vec<(ShipmentRecord, Vec<Fact>)> = Vec::new();
    for r in tx
        .query(
            "SELECT record FROM shipments WHERE vehicle = $1 AND NOT finished ORDER BY id FOR UPDATE",
            &[&device],
        )
        .await?
    {
        match serde_json::from_str::<ShipmentRecord>(r.get::<_, &str>(0)) {
            Ok(rec) => open.push((rec, Vec::new())),
            Err(e) => return Ok(Err(e.into())),
        }
    }
    for (rec, facts) in &mut open {
        for r in tx
            .query(
                "SELECT fact FROM shipment_facts WHERE shipment_id = $1",
                &[&rec.id],
            )
            .await?
        {
            match serde_json::from_str::<Fact>(r.get::<_, &str>(0)) {
                Ok(f) => facts.push(f),
                Err(e) => return Ok(Err(e.into())),
            }
        }
    }
    // Shipments the POD events name that are not open on this vehicle: on it in another
    // state (a second POD after delivery), another vehicle's, or unknown.
    let mut named: Vec<String> = Vec::new();
    for (_, _, ev) in events {
        if let Body::Pod(p) = &ev.body
            && !open.iter().any(|(r, _)| r.id == p.shipment_id.as_str())
        {
            named.push(p.shipment_id.to_string());
        }
    }
    named.sort();
    named.dedup();
    if !named.is_empty() {
        for r in tx
            .query(
                "SELECT record FROM shipments WHERE id = ANY($1) AND vehicle = $2 ORDER BY id FOR UPDATE",
                &[&named, &device],
            )
            .await?
        {
            let rec = match serde_json::from_str::<ShipmentRecord>(r.get::<_, &str>(0)) {
                Ok(rec) => rec,
                Err(e) => return Ok(Err(e.into())),
            };
            let mut facts = Vec::new();
            for f in tx
                .query("SELECT fact FROM shipment_facts WHERE shipment_id = $1", &[&rec.id])
                .await?
            {
                match serde_json::from_str::<Fact>(f.get::<_, &str>(0)) {
                    Ok(f) => facts.push(f),
                    Err(e) => return Ok(Err(e.into())),
                }
            }
            open.push((rec, facts));
        }
    }
    let known: std::collections::HashSet<String> = if named.is_empty() {
        Default::default()
    } else {
        tx.query("SELECT id FROM shipments WHERE id = ANY($1)", &[&named])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Arrivals at stops where this vehicle carries nothing open: the other vehicles'
    // open shipments there.
    let mut elsewhere: HashMap<&str, Vec<String>> = HashMap::new();
    for (_, _, ev) in events {
        if let Some(stop) = correlate::unmatched_arrival(ev, &open)
            && !elsewhere.contains_key(stop)
        {
            let mut ids = Vec::new();
            for r in tx
                .query(
                    "SELECT s.record FROM shipment_stops t JOIN shipments s ON s.id = t.shipment_id \
                     WHERE t.stop_id = $1 AND NOT s.finished AND s.vehicle <> $2 ORDER BY s.id",
                    &[&stop, &device],
                )
                .await?
            {
                match serde_json::from_str::<ShipmentRecord>(r.get::<_, &str>(0)) {
                    Ok(rec) if rec.spec.stops.iter().any(|s| s.id == stop) => ids.push(rec.id),
                    Ok(_) => {}
                    Err(e) => return Ok(Err(e.into())),
                }
            }
            elsewhere.insert(stop, ids);
        }
    }
    let recorded_ms = to_u64(recorded);
    let mut touched = std::collections::BTreeSet::new();
    for (epoch, seq, ev) in events {
        let c = correlate::correlate(
            device,
            *epoch,
            *seq,
            ev,
            recorded_ms,
            &open,
            &|id| known.contains(id),
            &|stop| elsewhere.get(stop).cloned().unwrap_or_default(),
        );
        for (sid, fact) in c.facts {
            let text = match serde_json::to_string(&fact) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e.into())),
            };
            let n = tx
                .execute(
                    "INSERT INTO shipment_facts (shipment_id, fact_id, fact) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&sid, &fact.id, &text],
                )
                .await?;
            if n == 1 {
                fresh.entry(sid.clone()).or_default().push(fact.clone());
            }
            if let Some((_, facts)) = open.iter_mut().find(|(r, _)| r.id == sid)
                && !facts.iter().any(|f| f.id == fact.id)
            {
                facts.push(fact);
                touched.insert(sid);
            }
        }
        for item in c.reviews {
            let text = match serde_json::to_string(&item) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e.into())),
            };
            tx.execute(
                "INSERT INTO reviews (id, status, created_ms, record, shipment_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&item.id, &item.status.as_str(), &recorded, &text, &item.shipment_id],
            )
            .await?;
        }
    }
    for (rec, facts) in &mut open {
        if !touched.contains(&rec.id) {
            continue;
        }
        rec.rev += 1;
        rec.updated_ms = recorded_ms;
        rec.state = crate::shipments::facts::replay(facts, &rec.spec);
        let new = fresh.remove(&rec.id).unwrap_or_default();
        let rows = outbox::rows_for(sinks, rec, &new, recorded_ms);
        if !rows.is_empty() {
            pushed.store(true, Ordering::Relaxed);
        }
        if let Err(e) = insert_outbox(tx, &rows).await? {
            return Ok(Err(e));
        }
        let text = match serde_json::to_string(&*rec) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.into())),
        };
        tx.execute(
            "UPDATE shipments SET rev = $2, state = $3, finished = $4, updated_ms = $5, record = $6 WHERE id = $1",
            &[
                &rec.id,
                &to_i64(rec.rev).unwrap_or(i64::MAX),
                &rec.state.as_str(),
                &rec.state.is_finished(),
                &recorded,
                &text,
            ],
        )
        .await?;
    }
    Ok(Ok(()))
}

/// The JSON documents in the first column of `rows`.
fn json_rows<T: serde::de::DeserializeOwned>(
    rows: &[tokio_postgres::Row],
) -> Result<Vec<T>, StoreError> {
    Ok(rows
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)))
        .collect::<Result<Vec<T>, _>>()?)
}

/// Writes outbox rows (those not there yet) inside a transaction.
async fn insert_outbox(
    tx: &Transaction<'_>,
    rows: &[OutboxRow],
) -> Result<Result<(), StoreError>, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(Ok(()));
    }
    let (mut id, mut sink, mut shipment, mut text) = (vec![], vec![], vec![], vec![]);
    for r in rows {
        match serde_json::to_string(r) {
            Ok(t) => text.push(t),
            Err(e) => return Ok(Err(e.into())),
        }
        id.push(r.id.as_str());
        sink.push(r.sink.as_str());
        shipment.push(r.shipment_id.as_str());
    }
    tx.execute(
        "INSERT INTO outbox (id, sink, shipment_id, row) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
         ON CONFLICT (id) DO NOTHING",
        &[&id, &sink, &shipment, &text],
    )
    .await?;
    Ok(Ok(()))
}

/// One chunk of `device`'s upload inside the round's transaction, under the device's
/// advisory lock (see the store's module note for the limits).
async fn put_chunk(
    tx: &Transaction<'_>,
    device: &str,
    chunk: &fleetsync_protocol::BlobChunk,
    now: i64,
    limits: &PartialBlobLimits,
) -> Result<ChunkOutcome, tokio_postgres::Error> {
    if let Some(why) = chunk_invalid(chunk) {
        return Ok(ChunkOutcome::Invalid(why));
    }
    let sha = &chunk.sha256[..];
    let drop_upload = "DELETE FROM blob_uploads WHERE device = $1 AND sha256 = $2";
    if tx
        .query_opt("SELECT 1 FROM blobs WHERE sha256 = $1", &[&sha])
        .await?
        .is_some()
    {
        // Done before (perhaps by another device): this device's upload is moot.
        tx.execute(drop_upload, &[&device, &sha]).await?;
        return Ok(ChunkOutcome::Complete);
    }
    let mut mine = Vec::new();
    for r in tx
        .query(
            "SELECT sha256, total_len, stored, updated_ms FROM blob_uploads WHERE device = $1",
            &[&device],
        )
        .await?
    {
        let Ok(s) = Sha256::try_from(r.get::<_, &[u8]>(0)) else {
            continue;
        };
        mine.push((
            s,
            UploadRecord {
                total_len: to_u32(r.get(1)),
                stored: to_u64(r.get(2)),
                updated_ms: to_u64(r.get(3)),
            },
        ));
    }
    let mut rec = mine
        .iter()
        .find(|(s, _)| *s == chunk.sha256)
        .map(|(_, r)| *r);
    if rec.is_some_and(|r| r.total_len != chunk.total_len) {
        // The same digest with another length: one of them is wrong; start over.
        tx.execute(drop_upload, &[&device, &sha]).await?;
        mine.retain(|(s, _)| *s != chunk.sha256);
        rec = None;
    }
    let off = i64::from(chunk.offset);
    let old_len = tx
        .query_opt(
            "SELECT length(data)::int8 FROM blob_parts WHERE device = $1 AND sha256 = $2 AND off = $3",
            &[&device, &sha, &off],
        )
        .await?
        .map_or(0, |r| to_u64(r.get(0)));
    let add = (chunk.data.len() as u64).saturating_sub(old_len);
    let mut evicted = 0u32;
    if add > 0 {
        for s in uploads_to_evict(&mine, &chunk.sha256, add, limits) {
            tx.execute(drop_upload, &[&device, &&s[..]]).await?;
            evicted += 1;
        }
    }
    let stored = rec.map_or(0, |r| r.stored) + chunk.data.len() as u64 - old_len;
    tx.execute(
        "INSERT INTO blob_uploads (device, sha256, total_len, stored, updated_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device, sha256) DO UPDATE SET \
         total_len = EXCLUDED.total_len, stored = EXCLUDED.stored, updated_ms = EXCLUDED.updated_ms",
        &[
            &device,
            &sha,
            &i64::from(chunk.total_len),
            &to_i64(stored).unwrap_or(i64::MAX),
            &now,
        ],
    )
    .await?;
    tx.execute(
        "INSERT INTO blob_parts (device, sha256, off, data) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (device, sha256, off) DO UPDATE SET data = EXCLUDED.data",
        &[&device, &sha, &off, &chunk.data.as_slice()],
    )
    .await?;
    if stored < u64::from(chunk.total_len) {
        return Ok(ChunkOutcome::Partial { evicted });
    }
    let parts: Vec<(u64, Vec<u8>)> = tx
        .query(
            "SELECT off, data FROM blob_parts WHERE device = $1 AND sha256 = $2 ORDER BY off",
            &[&device, &sha],
        )
        .await?
        .iter()
        .map(|r| (to_u64(r.get(0)), r.get(1)))
        .collect();
    let Some(blob) = assemble(&parts, chunk.total_len) else {
        return Ok(ChunkOutcome::Partial { evicted });
    };
    drop(parts);
    let digest: Sha256 = sha2::Sha256::digest(&blob).into();
    tx.execute(drop_upload, &[&device, &sha]).await?;
    if digest != chunk.sha256 {
        return Ok(ChunkOutcome::DigestMismatch);
    }
    tx.execute(
        "INSERT INTO blobs (sha256, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&sha, &blob],
    )
    .await?;
    Ok(ChunkOutcome::Complete)
}
