//! The change feed behind `/v1/portal/stream` and `/t/{token}/stream`, read from the
//! store so that it works the same with several hub replicas on one PostgreSQL.
//!
//! ```text
//! one task per hub reads the store when the store's portal signal changes (a shipment
//!   record or a position committed: by this hub, or by another hub on the same
//!   PostgreSQL, told by NOTIFY), at most once every MIN_GAP_MS, and every poll_ms
//!   without a signal; while no client is connected it reads nothing:
//!   shipments with updated_ms > watermark - SLACK_MS, by (updated_ms, id)   store query
//!     new (id, rev) only -> PortalShipment of it -> its customer's channel  (if any client)
//!     its vehicle is "dirty": which stop it drives to next is looked up again
//!   positions of the vehicles whose next stop is a delivery stop of a shipment whose
//!     customer has clients -> newer fix -> Position change to that customer's channel
//! channel per customer: tokio broadcast of PER_CLIENT_BUFFER changes (made by the first
//!   client, dropped with the last); a client that falls that far behind is dropped
//!   (RecvError::Lagged), never buffered without bound; it reconnects and resumes
//! ```
//!
//! Event ids are store cursors: `{updated_ms}-{shipment_id}` of the last shipment change
//! sent (a position event adds `~p{fix time}`). A client that comes back with
//! `Last-Event-ID` gets, from the store, every shipment of its customer written after
//! `updated_ms - SLACK_MS`, then the live changes. Events carry the whole view of a
//! shipment with its `rev`, so a change sent twice (the slack, two polls) changes nothing
//! on the page: delivery is at least once, and idempotent.
//!
//! A second replica: its own poller reads the same shared store, so a change committed
//! through either replica reaches the clients of both: at once through the signal (the
//! committing hub's own, every other hub's through `LISTEN`), within a poll if the
//! listening connection is down (plus the commit delay the slack covers: a write stamped
//! `updated_ms` before a read but committed after it is seen by the next reads, which look
//! `SLACK_MS` back). A client can reconnect to any replica with its `Last-Event-ID`,
//! since the id names a place in the store, not in one hub's memory. Positions come from the store's per-vehicle position rows, which
//! every replica's ingest writes. Nothing here holds state another replica needs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Portal;
use super::view::{self, PortalShipment, VehicleView};
use crate::shipments::spec::StopKind;
use crate::store::{ShipmentQuery, StoreError};

/// How far back each poll looks, for writes committed after the poll that read past
/// their `updated_ms` (and for clock skew between replicas).
pub const SLACK_MS: u64 = 5_000;
/// Shipment changes read per store page.
const PAGE: usize = 500;
/// Views built at once (each a few store reads): an ETA round changes every open
/// shipment at once, and built one by one they would hold up the positions behind them.
pub const VIEW_READS: usize = 8;
/// Most shipments sent to a resuming client from the store before the live changes.
pub const MAX_RESUME: usize = 1000;
/// Least time between the starts of two reads woken by the signal: under load the store
/// signals on every ingest round, and a read covers every change committed before it, so
/// the changes of this long are sent together (the latency it may add, against the
/// reads' cost; a read takes a few ms with a thousand watched vehicles).
pub const MIN_GAP_MS: u64 = 40;

/// One change, as every client of the customer gets it.
#[derive(Debug, Clone)]
pub enum Change {
    /// A shipment's new view.
    Shipment {
        /// Its cursor `(updated_ms, id)`.
        cursor: (u64, String),
        /// The whole view.
        view: Arc<PortalShipment>,
        /// The view as JSON, made once by the first client that sends it (a customer's
        /// clients all send the same bytes).
        json: OnceLock<String>,
    },
    /// The vehicle on its way to a shipment's delivery stop moved.
    Position {
        /// The shipment.
        shipment_id: String,
        /// Where the vehicle is.
        vehicle: VehicleView,
        /// The customer's event data as JSON, made once like a shipment's.
        json: OnceLock<String>,
    },
}

impl Change {
    /// The shipment it is about.
    pub fn shipment_id(&self) -> &str {
        match self {
            Change::Shipment { cursor, .. } => &cursor.1,
            Change::Position { shipment_id, .. } => shipment_id,
        }
    }
}

/// Clients' channels by customer.
#[derive(Debug, Default)]
pub struct Channels {
    by_customer: Mutex<HashMap<String, broadcast::Sender<Arc<Change>>>>,
}

impl Channels {
    /// A receiver of `customer`'s changes (the channel is made by its first client).
    pub fn subscribe(&self, customer: &str, buffer: usize) -> broadcast::Receiver<Arc<Change>> {
        let mut map = self.by_customer.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(customer.to_string())
            .or_insert_with(|| broadcast::channel(buffer.max(1)).0)
            .subscribe()
    }

    /// Whether `customer` has clients now; drops its channel once it has none.
    pub fn listening(&self, customer: &str) -> bool {
        let mut map = self.by_customer.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(customer) {
            Some(tx) if tx.receiver_count() > 0 => true,
            Some(_) => {
                map.remove(customer);
                false
            }
            None => false,
        }
    }

    /// Whether any customer has clients now.
    pub fn any(&self) -> bool {
        let map = self.by_customer.lock().unwrap_or_else(|p| p.into_inner());
        map.values().any(|tx| tx.receiver_count() > 0)
    }

    fn send(&self, customer: &str, c: Change) {
        let map = self.by_customer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(customer) {
            // No receiver left: nobody to tell.
            let _ = tx.send(Arc::new(c));
        }
    }
}

/// Per vehicle: the stop it drives to next and the shipments (id, customer) for which it
/// is a delivery stop.
type NextStops = BTreeMap<String, Vec<(String, String)>>;

/// The poller's memory (rebuilt from the store after a restart).
#[derive(Debug, Default)]
struct PollState {
    watermark: u64,
    /// `(id -> (rev, updated_ms))` of the changes seen within the slack.
    seen: HashMap<String, (u64, u64)>,
    next: NextStops,
    /// Vehicles whose next stop must be looked up again.
    dirty: HashSet<String>,
    first: bool,
    /// Newest fix time sent per vehicle.
    sent_fix: HashMap<String, u64>,
}

/// Runs the feed (and the store's listener for other hubs' changes) until `shutdown`.
pub async fn run(portal: Portal, shutdown: CancellationToken) {
    tokio::join!(
        read_loop(&portal, &shutdown),
        portal.store.listen_portal(shutdown.clone())
    );
}

async fn read_loop(portal: &Portal, shutdown: &CancellationToken) {
    let every = Duration::from_millis(portal.cfg.poll_ms.max(50));
    let gap = Duration::from_millis(MIN_GAP_MS);
    let mut wake = portal.store.portal_signal();
    let mut st = PollState {
        watermark: crate::ingest::now_ms().saturating_sub(SLACK_MS),
        first: true,
        ..Default::default()
    };
    let mut last = tokio::time::Instant::now();
    let mut signalled = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(last + every) => {}
            r = wake.changed(), if signalled => {
                if r.is_err() {
                    // The store's side is gone (it lives as long as the store): poll.
                    signalled = false;
                    continue;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(last + gap) => {}
                }
            }
        }
        // What is signalled from here on is after this read's start: it wakes the next.
        wake.borrow_and_update();
        last = tokio::time::Instant::now();
        if let Err(e) = poll(portal, &mut st).await {
            tracing::warn!(error = %e, "portal change feed: store poll failed; trying again");
        }
    }
}

async fn poll(portal: &Portal, st: &mut PollState) -> Result<(), StoreError> {
    let store = &portal.store;
    let now = crate::ingest::now_ms();
    if !portal.channels.any() {
        // Nobody to tell: the store is not read. A first client gets the last SLACK_MS
        // from its backlog read, and the vehicles' next stops are looked up afresh.
        st.watermark = now.saturating_sub(SLACK_MS);
        st.seen.clear();
        st.next.clear();
        st.dirty.clear();
        st.sent_fix.clear();
        st.first = true;
        return Ok(());
    }
    let from = st.watermark.saturating_sub(SLACK_MS);
    let mut after: Option<(u64, String)> = None;
    let mut high = st.watermark;
    loop {
        let rows = store
            .shipments(&ShipmentQuery {
                updated_after: Some(from),
                after: after.clone(),
                limit: PAGE,
                ..Default::default()
            })
            .await?;
        let full = rows.len() == PAGE;
        let mut todo = Vec::new();
        for r in rows {
            after = Some((r.updated_ms, r.id.clone()));
            high = high.max(r.updated_ms);
            if st.seen.get(&r.id).is_some_and(|(rev, _)| *rev >= r.rev) {
                continue;
            }
            if let Some(v) = &r.vehicle {
                st.dirty.insert(v.clone());
            }
            if !portal.channels.listening(&r.spec.customer_id) {
                st.seen.insert(r.id.clone(), (r.rev, r.updated_ms));
                continue;
            }
            todo.push(r);
        }
        // Built a few at once, sent in cursor order; marked seen once sent (a failed
        // read returns before the watermark moves: the next read builds them again).
        let ids: Vec<String> = todo.iter().map(|r| r.id.clone()).collect();
        let built: Vec<Result<Option<(String, Change)>, StoreError>> =
            futures_util::stream::iter(ids)
                .map(|id| {
                    let portal = portal.clone();
                    async move { shipment_change(&portal, &id, now).await }
                })
                .buffered(VIEW_READS)
                .collect()
                .await;
        for (r, b) in todo.iter().zip(built) {
            if let Some((customer, change)) = b? {
                portal.channels.send(&customer, change);
            }
            st.seen.insert(r.id.clone(), (r.rev, r.updated_ms));
        }
        if !full {
            break;
        }
    }
    st.watermark = high.max(now.saturating_sub(SLACK_MS));
    let floor = st.watermark.saturating_sub(2 * SLACK_MS);
    st.seen.retain(|_, (_, t)| *t >= floor);

    if st.first {
        st.first = false;
        st.dirty.extend(store.shipment_vehicles().await?);
    }
    if !st.dirty.is_empty() {
        let dirty: Vec<String> = st.dirty.drain().collect();
        for v in &dirty {
            st.next.remove(v);
        }
        let all = store.vehicles_shipments(&dirty).await?;
        for (vehicle, open) in all {
            let Ok(a) = crate::shipments::build_assignment(&open, 0) else {
                continue;
            };
            let Some(stop) = a.stops.first() else {
                continue;
            };
            let here: Vec<(String, String)> = open
                .iter()
                .filter(|(r, _)| {
                    stop.shipment_ids.iter().any(|i| i.as_str() == r.id)
                        && r.spec
                            .stops
                            .iter()
                            .any(|s| s.id == stop.id.as_str() && s.kind == StopKind::Delivery)
                })
                .map(|(r, _)| (r.id.clone(), r.spec.customer_id.clone()))
                .collect();
            if !here.is_empty() {
                st.next.insert(vehicle, here);
            }
        }
    }
    let watched: Vec<String> = st
        .next
        .iter()
        .filter(|(_, ships)| ships.iter().any(|(_, c)| portal.channels.listening(c)))
        .map(|(v, _)| v.clone())
        .collect();
    if watched.is_empty() {
        return Ok(());
    }
    let positions = store.positions(&watched).await?;
    for (vehicle, p) in positions {
        if now.saturating_sub(p.time_ms) >= crate::shipments::eta::STALE_AFTER_MS
            || st.sent_fix.get(&vehicle).is_some_and(|t| *t >= p.time_ms)
        {
            continue;
        }
        st.sent_fix.insert(vehicle.clone(), p.time_ms);
        for (shipment_id, customer) in st.next.get(&vehicle).into_iter().flatten() {
            portal.channels.send(
                customer,
                Change::Position {
                    shipment_id: shipment_id.clone(),
                    vehicle: VehicleView::of(&p),
                    json: OnceLock::new(),
                },
            );
        }
    }
    st.sent_fix.retain(|v, _| st.next.contains_key(v));
    Ok(())
}

/// Shipment `id`'s view as a change, with its customer.
pub async fn shipment_change(
    portal: &Portal,
    id: &str,
    now: u64,
) -> Result<Option<(String, Change)>, StoreError> {
    let Some((rec, facts)) = portal.store.shipment(id).await? else {
        return Ok(None);
    };
    let customer = rec.spec.customer_id.clone();
    Ok(Some((
        customer,
        view_change(portal, rec, facts, now).await?,
    )))
}

/// A shipment's customer view as of `now`, as a change.
async fn view_change(
    portal: &Portal,
    rec: crate::shipments::ShipmentRecord,
    facts: Vec<crate::shipments::Fact>,
    now: u64,
) -> Result<Change, StoreError> {
    let cursor = (rec.updated_ms, rec.id.clone());
    let loaded = view::load(&portal.store, rec, facts).await?;
    Ok(Change::Shipment {
        cursor,
        view: Arc::new(view::customer_view(portal.ctx(now), &loaded)),
        json: OnceLock::new(),
    })
}

/// How long a backlog view may be handed to further clients: clients that connect
/// together (a page reload across a customer's screens, every client after a hub restart)
/// share one build instead of one each, and a view this young is still current (its ETA,
/// its signed POD URLs).
const RECENT_VIEW_MS: u64 = 5_000;
/// Most recent backlog views kept.
const RECENT_VIEWS: usize = 4_096;

/// Backlog views built lately, by shipment: `(built at, change)`.
#[derive(Debug, Default)]
pub struct RecentViews {
    map: Mutex<HashMap<String, (u64, Arc<Change>)>>,
}

impl RecentViews {
    fn get(&self, cursor: &(u64, String), now: u64) -> Option<Arc<Change>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&cursor.1) {
            Some((built, c))
                if now.saturating_sub(*built) < RECENT_VIEW_MS
                    && matches!(&**c, Change::Shipment { cursor: k, .. } if k == cursor) =>
            {
                Some(c.clone())
            }
            _ => None,
        }
    }

    fn put(&self, c: Arc<Change>, now: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RECENT_VIEWS {
            map.retain(|_, (built, _)| now.saturating_sub(*built) < RECENT_VIEW_MS);
            if map.len() >= RECENT_VIEWS {
                map.clear();
            }
        }
        map.insert(c.shipment_id().to_string(), (now, c));
    }
}

/// A shipment's change for a client's backlog, with its customer: the view another
/// client's backlog built in the last [`RECENT_VIEW_MS`] if the record has not changed
/// since, else built now, at most [`VIEW_READS`] at once across every client (a
/// thousand clients connecting at once must not build ten thousand views at once).
pub async fn backlog_change(
    portal: &Portal,
    id: &str,
    now: u64,
) -> Result<Option<(String, Arc<Change>)>, StoreError> {
    let Some((rec, facts)) = portal.store.shipment(id).await? else {
        return Ok(None);
    };
    let customer = rec.spec.customer_id.clone();
    let cursor = (rec.updated_ms, rec.id.clone());
    if let Some(c) = portal.recent.get(&cursor, now) {
        return Ok(Some((customer, c)));
    }
    let _permit = portal.view_builds.acquire().await;
    // Another client may have built it while this one waited.
    let now = crate::ingest::now_ms().max(now);
    if let Some(c) = portal.recent.get(&cursor, now) {
        return Ok(Some((customer, c)));
    }
    let c = Arc::new(view_change(portal, rec, facts, now).await?);
    portal.recent.put(c.clone(), now);
    Ok(Some((customer, c)))
}

/// The ids of the shipments of `customer` written after `from_ms` (at most
/// [`MAX_RESUME`]), in cursor order: what a (re)connecting client gets before the live
/// changes. Each view is built when the client's stream gets to it ([`backlog_change`]),
/// so a client holds one backlog view at a time, not its customer's every shipment.
pub async fn backlog(
    portal: &Portal,
    customer: &str,
    only: Option<&str>,
    from_ms: u64,
) -> Result<Vec<String>, StoreError> {
    let rows = portal
        .store
        .shipments(&ShipmentQuery {
            updated_after: Some(from_ms),
            customer_id: Some(customer.to_string()),
            limit: MAX_RESUME,
            ..Default::default()
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter(|r| only.is_none_or(|id| id == r.id))
        .map(|r| r.id)
        .collect())
}

/// Parses a `Last-Event-ID` into the `updated_ms` it names.
pub fn parse_event_id(id: &str) -> Option<u64> {
    let base = id.split('~').next()?;
    base.split_once('-')?.0.parse().ok()
}

/// Formats an event id: the cursor, and `~p{n}` for a position event.
pub fn event_id(cursor: &(u64, String), position: Option<u64>) -> String {
    match position {
        Some(t) => format!("{}-{}~p{t}", cursor.0, cursor.1),
        None => format!("{}-{}", cursor.0, cursor.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_store_cursors() {
        let c = (1_700_000_000_123, "S-1~x".to_string());
        assert_eq!(parse_event_id(&event_id(&c, None)), Some(c.0));
        assert_eq!(parse_event_id(&event_id(&c, Some(5))), Some(c.0));
        assert_eq!(parse_event_id("junk"), None);
    }

    #[tokio::test]
    async fn a_slow_client_lags_and_is_told_so() {
        let ch = Channels::default();
        let mut rx = ch.subscribe("ACME", 4);
        assert!(ch.listening("ACME"));
        for i in 0..10 {
            ch.send(
                "ACME",
                Change::Position {
                    shipment_id: format!("S{i}"),
                    vehicle: VehicleView {
                        time: fleetsync_protocol::json::Time(i),
                        lat: 0.0,
                        lon: 0.0,
                        speed_mps: None,
                    },
                    json: OnceLock::new(),
                },
            );
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(6))
        ));
        drop(rx);
        assert!(
            !ch.listening("ACME"),
            "the last client gone, the channel goes"
        );
    }
}
