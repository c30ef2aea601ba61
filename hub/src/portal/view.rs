//! What a customer and a consignee see of a shipment: the experience layer's two views,
//! built from the record, its facts and a few store reads, never the fleet's raw data.
//!
//! ```text
//! PortalShipment (customer, own shipments only)
//!   id, reference, status (the mapping table's portal_status), timeliness, rev, updated
//!   stops[]        this shipment's stops: name, address, window, completed, eta, eta_window
//!   next_stop      the first stop not completed, with its ETA window
//!   timeline[]     PLN windows, the latest EST per open stop, ACT not retracted, by
//!                  event_time; the source only as vehicle | erp | operator
//!   vehicle        its newest fix, ONLY while the vehicle's next stop is a delivery stop
//!                  of this shipment and the fix is fresh (never its id, never its driver)
//!   pod            after DELIVERED / DELIVERY_FAILED: outcome, reason, recipient, time,
//!                  confirmed, signature and photo URLs (signed, scoped to one blob of
//!                  this POD, valid pod_url_ttl_s)
//! TrackingShipment (anyone with the link): reduced from PortalShipment
//!   reference, status, the delivery stop only, the timeline up to the delivery without
//!   any other stop, the vehicle under the same rule until delivery, then only a POD
//!   summary (outcome, time, signed, photo count): no recipient, no URLs, no customer
//! ```

use fleetsync_protocol::json::Time;
use fleetsync_protocol::{Body, Outcome, Pod};
use serde::Serialize;

use super::links::{BlobClaims, Signer};
use crate::shipments::eta::{STALE_AFTER_MS, VehiclePosition};
use crate::shipments::facts::{Classifier, FactType, Mappings, Source, State};
use crate::shipments::spec::{StopKind, WindowSpec};
use crate::shipments::{Fact, ShipmentRecord, completed_stops, eta, planned};
use crate::store::{Store, StoreError};

/// A stop as the customer sees it.
#[derive(Debug, Clone, Serialize)]
pub struct StopView {
    /// The ERP's location id.
    pub id: String,
    /// pickup | delivery.
    pub kind: StopKind,
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// `[lat, lon]` of its centre, for the map.
    pub location: Option<[f64; 2]>,
    /// The agreed window.
    pub window: Option<WindowSpec>,
    /// Done.
    pub completed: bool,
    /// The estimate, while the stop is open.
    pub eta: Option<Time>,
    /// The estimate as a window a person can plan with.
    pub eta_window: Option<EtaWindow>,
    /// unknown | on_time | at_risk | late.
    pub timeliness: &'static str,
}

/// An ETA as a window: the estimate widened by a fifth of the time still to go (at least
/// 10 minutes, at most an hour each side), rounded out to 5 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EtaWindow {
    /// Not before.
    pub earliest: Time,
    /// Not after.
    pub latest: Time,
}

/// The window around `eta_ms` seen at `now_ms`.
pub fn eta_window(eta_ms: u64, now_ms: u64) -> EtaWindow {
    const FIVE_MIN: u64 = 300_000;
    let margin = (eta_ms.saturating_sub(now_ms) / 5).clamp(600_000, 3_600_000);
    let lo = eta_ms.saturating_sub(margin) / FIVE_MIN * FIVE_MIN;
    let hi = (eta_ms + margin).div_ceil(FIVE_MIN) * FIVE_MIN;
    EtaWindow {
        earliest: Time(lo.max(now_ms / FIVE_MIN * FIVE_MIN)),
        latest: Time(hi),
    }
}

/// The next stop and its ETA window.
#[derive(Debug, Clone, Serialize)]
pub struct NextStop {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// When the vehicle should be there.
    pub eta_window: Option<EtaWindow>,
}

/// One milestone.
#[derive(Debug, Clone, Serialize)]
pub struct Milestone {
    /// DISPATCHED, DEPARTED, ARRIVED, DELIVERED, ...
    #[serde(rename = "type")]
    pub kind: FactType,
    /// PLN | EST | ACT.
    pub classifier: Classifier,
    /// The stop, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_id: Option<String>,
    /// When (planned, estimated or actual).
    pub event_time: Time,
    /// vehicle | erp | operator.
    pub source: &'static str,
}

/// Where the vehicle is.
#[derive(Debug, Clone, Serialize)]
pub struct VehicleView {
    /// Capture time of the fix.
    pub time: Time,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Ground speed (m/s).
    pub speed_mps: Option<f64>,
}

impl VehicleView {
    /// The view of a stored position.
    pub fn of(p: &VehiclePosition) -> VehicleView {
        VehicleView {
            time: Time(p.time_ms),
            lat: f64::from(p.lat_e7) / 1e7,
            lon: f64::from(p.lon_e7) / 1e7,
            speed_mps: p.speed_cmps.map(|v| f64::from(v) / 100.0),
        }
    }
}

/// A POD image URL.
#[derive(Debug, Clone, Serialize)]
pub struct ImageUrl {
    /// Signed, short-lived.
    pub url: String,
    /// Its media type.
    pub media_type: &'static str,
}

/// The proof of delivery.
#[derive(Debug, Clone, Serialize)]
pub struct PodView {
    /// delivered | refused | damaged | partial.
    pub outcome: &'static str,
    /// Why, unless delivered.
    pub reason_code: Option<String>,
    /// Who received it.
    pub recipient: String,
    /// When it was captured.
    pub time: Time,
    /// The evidence meets the policy, or an operator accepted it.
    pub confirmed: bool,
    /// The signature image.
    pub signature: Option<ImageUrl>,
    /// The photos.
    pub photos: Vec<ImageUrl>,
}

/// A shipment as its customer sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PortalShipment {
    /// The ERP's id.
    pub id: String,
    /// The ERP's reference.
    pub reference: String,
    /// The portal status (mapping table).
    pub status: String,
    /// The mapping table's version.
    pub mapping_version: String,
    /// unknown | on_time | at_risk | late.
    pub timeliness: &'static str,
    /// Counts every write: a client keeps the view with the highest.
    pub rev: u64,
    /// Last written.
    pub updated: Time,
    /// Its stops.
    pub stops: Vec<StopView>,
    /// The first stop not completed.
    pub next_stop: Option<NextStop>,
    /// Milestones by event time.
    pub timeline: Vec<Milestone>,
    /// The vehicle while it drives to this shipment's delivery stop.
    pub vehicle: Option<VehicleView>,
    /// After delivery.
    pub pod: Option<PodView>,
    /// Not shown: whether the shipment is finished (the tracking view's cut-off).
    #[serde(skip)]
    pub finished: bool,
}

/// What a shipment's views are built from, read from the store.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The record.
    pub rec: ShipmentRecord,
    /// Its facts.
    pub facts: Vec<Fact>,
    /// Its vehicle's newest fix.
    pub position: Option<VehiclePosition>,
    /// Whether the vehicle's next stop is one of this shipment's delivery stops.
    pub heading_here: bool,
    /// The POD event (capture time, body), after delivery.
    pub pod: Option<(u64, Pod)>,
}

/// The stop a vehicle drives to next and the shipments there: the first stop of the
/// assignment its open shipments make (stops in planned order, completed ones left out).
pub async fn next_stop_of(
    store: &Store,
    vehicle: &str,
) -> Result<Option<(String, Vec<String>)>, StoreError> {
    let open = store.vehicle_shipments(vehicle).await?;
    Ok(crate::shipments::build_assignment(&open, 0)
        .ok()
        .and_then(|a| {
            a.stops.first().map(|s| {
                (
                    s.id.to_string(),
                    s.shipment_ids.iter().map(|i| i.to_string()).collect(),
                )
            })
        }))
}

/// The ACT facts not retracted.
fn standing(facts: &[Fact]) -> impl Iterator<Item = &Fact> {
    let retracted: std::collections::HashSet<&str> = facts
        .iter()
        .filter(|f| f.kind == FactType::Retracted)
        .filter_map(|f| f.retracts.as_deref())
        .collect();
    facts.iter().filter(move |f| {
        f.classifier == Classifier::Actual
            && f.kind != FactType::Retracted
            && !retracted.contains(f.id.as_str())
    })
}

/// Reads what the views of `rec` need.
pub async fn load(
    store: &Store,
    rec: ShipmentRecord,
    facts: Vec<Fact>,
) -> Result<Loaded, StoreError> {
    let mut position = None;
    let mut heading_here = false;
    if let Some(v) = &rec.vehicle {
        position = store.positions(std::slice::from_ref(v)).await?.remove(v);
        if !rec.state.is_finished()
            && let Some((stop, ids)) = next_stop_of(store, v).await?
        {
            let done = completed_stops(&facts);
            heading_here = ids.contains(&rec.id)
                && !done.contains(&stop)
                && rec
                    .spec
                    .stops
                    .iter()
                    .any(|s| s.id == stop && s.kind == StopKind::Delivery);
        }
    }
    let delivered = handovers(&facts).max_by_key(|f| (f.event_time, f.id.clone()));
    let pod = match delivered {
        Some(f) => pod_of(store, f).await?,
        None => None,
    };
    Ok(Loaded {
        rec,
        facts,
        position,
        heading_here,
        pod,
    })
}

/// The standing DELIVERED and DELIVERY_FAILED facts: one per POD the shipment holds.
fn handovers(facts: &[Fact]) -> impl Iterator<Item = &Fact> {
    standing(facts).filter(|f| matches!(f.kind, FactType::Delivered | FactType::DeliveryFailed))
}

/// The POD (with its capture time) behind a device's DELIVERED or DELIVERY_FAILED fact.
async fn pod_of(store: &Store, f: &Fact) -> Result<Option<(u64, Pod)>, StoreError> {
    match &f.source {
        Source::Device { device, epoch, seq } => pod_event(store, device, *epoch, *seq).await,
        _ => Ok(None),
    }
}

/// `device`'s event `(epoch, seq)` with its capture time, if it is a POD.
pub async fn pod_event(
    store: &Store,
    device: &str,
    epoch: u32,
    seq: u64,
) -> Result<Option<(u64, Pod)>, StoreError> {
    let Some(prev) = seq.checked_sub(1) else {
        return Ok(None);
    };
    let rows = store.events(device, Some((epoch, prev)), 1, None).await?;
    Ok(match rows.into_iter().next() {
        Some((e, s, stored)) if (e, s) == (epoch, seq) => match stored.event.body {
            Body::Pod(p) => Some((stored.event.time_ms, p)),
            _ => None,
        },
        _ => None,
    })
}

/// The media type of blob `sha` if it is the signature or a photo of one of the
/// shipment's standing PODs (a POD URL opens for those and nothing else).
pub async fn pod_blob_media(
    store: &Store,
    facts: &[Fact],
    sha: &[u8; 32],
) -> Result<Option<&'static str>, StoreError> {
    for f in handovers(facts) {
        if let Some((_, p)) = pod_of(store, f).await?
            && let Some(b) = p
                .signature
                .iter()
                .chain(p.photos.iter())
                .find(|b| b.sha256 == *sha)
        {
            return Ok(Some(b.media.mime()));
        }
    }
    Ok(None)
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered",
        Outcome::Refused => "refused",
        Outcome::Damaged => "damaged",
        Outcome::Partial => "partial",
    }
}

fn source_str(s: &Source) -> &'static str {
    match s {
        Source::Device { .. } => "vehicle",
        Source::Erp { .. } => "erp",
        Source::Operator { .. } => "operator",
    }
}

/// How a view is built: the mapping table, the URL signer, the time.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The mapping tables.
    pub mappings: &'a Mappings,
    /// Signs POD URLs.
    pub signer: &'a Signer,
    /// How long a POD URL is valid.
    pub pod_url_ttl_s: u64,
    /// Now (ms).
    pub now_ms: u64,
}

/// The portal status of `state`.
pub fn portal_status(m: &Mappings, state: State) -> String {
    m.of(state)
        .map_or_else(|| state.as_str().to_string(), |r| r.portal_status.clone())
}

/// The customer's view.
pub fn customer_view(ctx: Ctx<'_>, l: &Loaded) -> PortalShipment {
    let r = &l.rec;
    let done = completed_stops(&l.facts);
    let fresh = l
        .position
        .as_ref()
        .filter(|p| ctx.now_ms.saturating_sub(p.time_ms) < STALE_AFTER_MS);
    let (timeliness, per_stop) = eta::of_shipment(
        r,
        &l.facts,
        l.position.as_ref().map(|p| p.time_ms),
        ctx.now_ms,
    );
    let finished = r.state.is_finished();
    let stops: Vec<StopView> = r
        .spec
        .stops
        .iter()
        .map(|s| {
            let eta = r
                .estimates
                .get(&s.id)
                .filter(|_| !finished && !done.contains(&s.id))
                .map(|e| e.eta_ms);
            StopView {
                id: s.id.clone(),
                kind: s.kind,
                name: s.name.clone(),
                address: s.address.clone(),
                location: s.location.map(|p| [p.lat, p.lon]).or_else(|| {
                    s.polygon.as_ref().and_then(|p| {
                        let n = p.len() as f64;
                        (n > 0.0).then(|| {
                            [
                                p.iter().map(|q| q[0]).sum::<f64>() / n,
                                p.iter().map(|q| q[1]).sum::<f64>() / n,
                            ]
                        })
                    })
                }),
                window: s.window,
                completed: done.contains(&s.id),
                eta: eta.map(Time),
                eta_window: eta.map(|e| eta_window(e, ctx.now_ms)),
                timeliness: per_stop
                    .get(s.id.as_str())
                    .map_or("unknown", |t| t.as_str()),
            }
        })
        .collect();
    let next_stop = if finished {
        None
    } else {
        stops.iter().find(|s| !s.completed).map(|s| NextStop {
            id: s.id.clone(),
            name: s.name.clone(),
            eta_window: s.eta_window,
        })
    };
    // PLN windows, the latest EST of each open stop, ACT not retracted.
    let mut all = planned(r);
    let mut latest_est: std::collections::BTreeMap<&str, &Fact> = Default::default();
    for f in l
        .facts
        .iter()
        .filter(|f| f.classifier == Classifier::Estimated)
    {
        if let Some(stop) = f.stop_id.as_deref()
            && !done.contains(stop)
            && !finished
            && latest_est
                .get(stop)
                .is_none_or(|g| g.recorded_time <= f.recorded_time)
        {
            latest_est.insert(stop, f);
        }
    }
    all.extend(latest_est.into_values().cloned());
    all.extend(standing(&l.facts).cloned());
    let timeline = crate::shipments::facts::timeline(&all)
        .into_iter()
        .map(|f| Milestone {
            source: source_str(&f.source),
            kind: f.kind,
            classifier: f.classifier,
            stop_id: f.stop_id,
            event_time: f.event_time,
        })
        .collect();
    let confirmed = matches!(r.state, State::PodConfirmed | State::Closed)
        || standing(&l.facts).any(|f| f.kind == FactType::PodConfirmed);
    let exp_s = ctx.now_ms / 1000 + ctx.pod_url_ttl_s;
    let url = |b: &fleetsync_protocol::BlobRef| ImageUrl {
        url: format!(
            "/p/{}",
            ctx.signer.blob(&BlobClaims {
                shipment_id: r.id.clone(),
                sha256_hex: hex::encode(b.sha256),
                exp_s,
            })
        ),
        media_type: b.media.mime(),
    };
    let pod = l.pod.as_ref().map(|(t, p)| PodView {
        outcome: outcome_str(p.outcome),
        reason_code: p.reason_code.as_ref().map(|c| c.to_string()),
        recipient: p.recipient_name.to_string(),
        time: Time(*t),
        confirmed,
        signature: p.signature.as_ref().map(url),
        photos: p.photos.iter().map(url).collect(),
    });
    PortalShipment {
        id: r.id.clone(),
        reference: r.spec.reference.clone(),
        status: portal_status(ctx.mappings, r.state),
        mapping_version: ctx.mappings.version.clone(),
        timeliness: timeliness.as_str(),
        rev: r.rev,
        updated: Time(r.updated_ms),
        stops,
        next_stop,
        timeline,
        vehicle: fresh.filter(|_| l.heading_here).map(VehicleView::of),
        pod,
        finished,
    }
}

/// A consignee's stop.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingStop {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// `[lat, lon]`, for the map.
    pub location: Option<[f64; 2]>,
    /// The agreed window.
    pub window: Option<WindowSpec>,
    /// When the vehicle should be there (until delivery).
    pub eta_window: Option<EtaWindow>,
    /// Done.
    pub completed: bool,
}

/// The POD as a tracking link shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PodSummary {
    /// delivered | refused | damaged | partial.
    pub outcome: &'static str,
    /// When.
    pub time: Time,
    /// A signature was taken.
    pub signed: bool,
    /// Photos taken.
    pub photos: usize,
}

/// A milestone as a tracking link shows it (no stop, no source).
#[derive(Debug, Clone, Serialize)]
pub struct TrackingMilestone {
    /// DISPATCHED, DEPARTED, ARRIVED, DELIVERED, DELIVERY_FAILED.
    #[serde(rename = "type")]
    pub kind: FactType,
    /// PLN | EST | ACT.
    pub classifier: Classifier,
    /// When.
    pub event_time: Time,
}

/// A shipment as a tracking link shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingShipment {
    /// The ERP's reference.
    pub reference: String,
    /// The portal status.
    pub status: String,
    /// Counts every write.
    pub rev: u64,
    /// The delivery stop.
    pub stop: Option<TrackingStop>,
    /// Up to the delivery, this stop only.
    pub timeline: Vec<TrackingMilestone>,
    /// The vehicle, while it drives to this stop.
    pub vehicle: Option<VehicleView>,
    /// After delivery.
    pub pod: Option<PodSummary>,
}

/// The consignee's view, reduced from the customer's.
pub fn tracking_view(p: &PortalShipment) -> TrackingShipment {
    let deliveries: Vec<&StopView> = p
        .stops
        .iter()
        .filter(|s| s.kind == StopKind::Delivery)
        .collect();
    let stop = deliveries
        .iter()
        .find(|s| !s.completed)
        .or(deliveries.last())
        .copied();
    let delivered_at = p
        .timeline
        .iter()
        .filter(|m| {
            m.classifier == Classifier::Actual
                && matches!(m.kind, FactType::Delivered | FactType::DeliveryFailed)
        })
        .map(|m| m.event_time)
        .max();
    let here = stop.map(|s| s.id.as_str());
    let timeline = p
        .timeline
        .iter()
        .filter(|m| delivered_at.is_none_or(|t| m.event_time <= t))
        .filter(|m| match m.kind {
            FactType::Dispatched => true,
            // Leaving any stop of this shipment (its pickup): "on its way", not where.
            FactType::Departed => m.stop_id.as_deref() != here,
            FactType::Arrived | FactType::Eta | FactType::Delivered | FactType::DeliveryFailed => {
                m.stop_id.as_deref() == here
            }
            _ => false,
        })
        .map(|m| TrackingMilestone {
            kind: m.kind,
            classifier: m.classifier,
            event_time: m.event_time,
        })
        .collect();
    let done = delivered_at.is_some() || p.finished;
    TrackingShipment {
        reference: p.reference.clone(),
        status: p.status.clone(),
        rev: p.rev,
        stop: stop.map(|s| TrackingStop {
            name: s.name.clone(),
            address: s.address.clone(),
            location: s.location,
            window: s.window,
            eta_window: s.eta_window.filter(|_| !done),
            completed: s.completed,
        }),
        timeline,
        vehicle: p.vehicle.clone().filter(|_| !done),
        pod: p.pod.as_ref().map(|d| PodSummary {
            outcome: d.outcome,
            time: d.time,
            signed: d.signature.is_some(),
            photos: d.photos.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_windows_widen_with_the_time_to_go_and_round_out() {
        let now = 1_000_000_000_000;
        let w = eta_window(now + 600_000, now);
        assert!(w.latest.0 - w.earliest.0 >= 1_200_000, "{w:?}");
        assert_eq!(w.earliest.0 % 300_000, 0);
        assert_eq!(w.latest.0 % 300_000, 0);
        assert!(w.earliest.0 <= now + 600_000 && now + 600_000 <= w.latest.0);
        let far = eta_window(now + 5 * 3_600_000, now);
        assert!(far.latest.0 - far.earliest.0 >= 2 * 3_600_000 - 600_000);
        assert!(far.latest.0 - far.earliest.0 <= 2 * 3_600_000 + 600_000);
        // Never earlier than now.
        let past = eta_window(now - 60_000, now);
        assert!(past.earliest.0 >= now / 300_000 * 300_000);
    }
}
