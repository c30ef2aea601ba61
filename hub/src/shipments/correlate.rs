//! From what a vehicle reports to facts of the shipments it carries.
//!
//! Pure: the store calls [`correlate`] inside the ingest round that stores the event (the
//! same transaction as its dedup insert), with the vehicle's open shipments, and writes
//! what it returns. Every fact and review item is keyed by the source event
//! (`device:epoch:seq`; device ids have no `:`, and the id is safe in a URL path), so a
//! redelivered event adds nothing.
//!
//! ```text
//! Trip Arrived{stop}   -> ARRIVED  for each open shipment of the vehicle with that stop;
//!                         none, but another vehicle's open shipment has it: a review
//!                         item (an arrival at a stop of another vehicle's shipment)
//! Trip Departed{stop}  -> DEPARTED for each open shipment of the vehicle with that stop
//! Pod{shipment, stop}  -> DELIVERED (outcome delivered, damaged, partial) or
//!                         DELIVERY_FAILED (refused) of that shipment, if the vehicle
//!                         carries it and it has that stop; otherwise a review item
//!                         (unknown shipment, or not this vehicle's)
//! ```
//!
//! The device's geofence events say the same as its trip arrivals and departures (the
//! agent emits both for each stop transition), so only the trip events make facts.
//! Whether a DELIVERED becomes POD_CONFIRMED is judged apart ([`judge_pod`]): its photos
//! arrive after the POD event.

use fleetsync_protocol::json::Time;
use fleetsync_protocol::{Body, Event, Fence, Outcome, Pod, TripKind};
use serde::{Deserialize, Serialize};

use super::ShipmentRecord;
use super::facts::{Classifier, Fact, FactType, Source};

/// Metres a POD's geo-stamp may lie outside its stop's fence: the fix's accuracy, which
/// the POD does not carry (a phone-grade fix in a street is good to about this).
pub const POD_GEO_SLACK_M: f64 = 50.0;

/// Why an event or POD waits for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// The POD's geo-stamp is outside the stop's fence (plus the accuracy slack).
    PodOutsideFence,
    /// The POD lacks evidence the shipment's policy requires.
    PodMissingEvidence,
    /// The POD was captured before the vehicle arrived at the stop.
    PodBeforeArrival,
    /// A POD from a vehicle the shipment is not assigned to.
    NotAssignedVehicle,
    /// An arrival at a stop of another vehicle's shipment (none of its own there).
    ArrivalNotAssigned,
    /// An event naming a shipment the hub does not know.
    UnknownShipment,
}

impl ReviewKind {
    /// The rule that fired, for people.
    pub fn rule(self) -> &'static str {
        match self {
            ReviewKind::PodOutsideFence => {
                "the POD's geo-stamp is outside the stop's fence (radius plus 50 m for the fix's accuracy)"
            }
            ReviewKind::PodMissingEvidence => {
                "the POD lacks the signature or photos the shipment's POD policy requires"
            }
            ReviewKind::PodBeforeArrival => {
                "the POD was captured before the vehicle's arrival at the stop"
            }
            ReviewKind::NotAssignedVehicle => {
                "the POD comes from a vehicle the shipment is not assigned to"
            }
            ReviewKind::ArrivalNotAssigned => {
                "the vehicle arrived at a stop of another vehicle's shipment, with none of its own there"
            }
            ReviewKind::UnknownShipment => "the event names a shipment the hub does not know",
        }
    }
}

/// An item of the review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// Stable id, from the source event.
    pub id: String,
    /// What fired.
    pub kind: ReviewKind,
    /// The shipment named, if any.
    pub shipment_id: Option<String>,
    /// The stop named, if any.
    pub stop_id: Option<String>,
    /// The event that needs a decision.
    pub source: Source,
    /// The event's capture time.
    pub event_time: Time,
    /// When the hub queued it.
    pub created_time: Time,
    /// open | accepted | rejected.
    pub status: ReviewStatus,
    /// Who decided, and their note.
    pub decided_by: Option<String>,
    /// The decision's note.
    pub note: Option<String>,
    /// When decided.
    pub decided_time: Option<Time>,
    /// What the rule saw, for people (distances, counts).
    pub detail: String,
}

/// Where a review item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    /// Waiting for an operator.
    Open,
    /// Accepted: the event counts.
    Accepted,
    /// Rejected: it does not.
    Rejected,
}

impl ReviewStatus {
    /// The status's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewStatus::Open => "open",
            ReviewStatus::Accepted => "accepted",
            ReviewStatus::Rejected => "rejected",
        }
    }
}

/// What one event means for shipments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Correlated {
    /// New facts, by shipment id.
    pub facts: Vec<(String, Fact)>,
    /// New review items.
    pub reviews: Vec<ReviewItem>,
}

/// The id of facts and review items from a device event.
pub fn source_id(device: &str, epoch: u32, seq: u64) -> String {
    format!("{device}:{epoch}:{seq}")
}

/// The stop an event is an arrival at for which the vehicle has no open shipment: the
/// store then looks up [`correlate`]'s `elsewhere` for it.
pub fn unmatched_arrival<'a>(
    event: &'a Event,
    open: &[(ShipmentRecord, Vec<Fact>)],
) -> Option<&'a str> {
    let Body::Trip(t) = &event.body else {
        return None;
    };
    let stop = t.stop_id.as_deref()?;
    (t.kind == TripKind::Arrived
        && !open
            .iter()
            .any(|(r, _)| !r.state.is_finished() && r.spec.stops.iter().any(|s| s.id == stop)))
    .then_some(stop)
}

/// The facts and review items a device's event implies, given the vehicle's shipments
/// (those not finished, and those its POD events name that are on it in any state);
/// `known(shipment_id)` says whether the hub knows a shipment at all, and
/// `elsewhere(stop)` names the open shipments of other vehicles at a stop (asked only for
/// an [`unmatched_arrival`]).
#[allow(clippy::too_many_arguments)]
pub fn correlate(
    device: &str,
    epoch: u32,
    seq: u64,
    event: &Event,
    recorded_ms: u64,
    open: &[(ShipmentRecord, Vec<Fact>)],
    known: &dyn Fn(&str) -> bool,
    elsewhere: &dyn Fn(&str) -> Vec<String>,
) -> Correlated {
    let id = source_id(device, epoch, seq);
    let source = Source::Device {
        device: device.to_string(),
        epoch,
        seq,
    };
    let fact = |kind: FactType, stop: &str| Fact {
        id: id.clone(),
        kind,
        classifier: Classifier::Actual,
        stop_id: Some(stop.to_string()),
        event_time: Time(event.time_ms),
        recorded_time: Time(recorded_ms),
        source: source.clone(),
        retracts: None,
        note: None,
    };
    let mut out = Correlated::default();
    match &event.body {
        Body::Trip(t) => {
            let kind = match t.kind {
                TripKind::Arrived => FactType::Arrived,
                TripKind::Departed => FactType::Departed,
                _ => return out,
            };
            let Some(stop) = t.stop_id.as_deref() else {
                return out;
            };
            for (rec, _) in open {
                if !rec.state.is_finished() && rec.spec.stops.iter().any(|s| s.id == stop) {
                    out.facts.push((rec.id.clone(), fact(kind, stop)));
                }
            }
            if unmatched_arrival(event, open).is_some() {
                let others = elsewhere(stop);
                if let Some(first) = others.first() {
                    out.reviews.push(ReviewItem {
                        id: id.clone(),
                        kind: ReviewKind::ArrivalNotAssigned,
                        shipment_id: Some(first.clone()),
                        stop_id: Some(stop.to_string()),
                        source,
                        event_time: Time(event.time_ms),
                        created_time: Time(recorded_ms),
                        status: ReviewStatus::Open,
                        decided_by: None,
                        note: None,
                        decided_time: None,
                        detail: format!(
                            "{device} arrived at stop {stop}, where it carries no open shipment; open there on other vehicles: {}",
                            others.join(", ")
                        ),
                    });
                }
            }
        }
        Body::Pod(p) => {
            let kind = match p.outcome {
                Outcome::Refused => FactType::DeliveryFailed,
                Outcome::Delivered | Outcome::Damaged | Outcome::Partial => FactType::Delivered,
            };
            // The vehicle's shipment, also when it is delivered already (a second POD for
            // it is a fact of it too, not a stranger's).
            let mine = open
                .iter()
                .find(|(r, _)| r.id == p.shipment_id.as_str())
                .filter(|(r, _)| r.vehicle.as_deref() == Some(device))
                .filter(|(r, _)| r.spec.stops.iter().any(|s| s.id == p.stop_id.as_str()));
            match mine {
                Some((rec, _)) => {
                    let mut f = fact(kind, &p.stop_id);
                    f.note =
                        Some(format!("POD {} ({:?})", p.pod_id.as_str(), p.outcome).to_lowercase());
                    out.facts.push((rec.id.clone(), f));
                }
                None => {
                    let review_kind = if known(&p.shipment_id) {
                        ReviewKind::NotAssignedVehicle
                    } else {
                        ReviewKind::UnknownShipment
                    };
                    out.reviews.push(ReviewItem {
                        id: id.clone(),
                        kind: review_kind,
                        shipment_id: Some(p.shipment_id.to_string()),
                        stop_id: Some(p.stop_id.to_string()),
                        source,
                        event_time: Time(event.time_ms),
                        created_time: Time(recorded_ms),
                        status: ReviewStatus::Open,
                        decided_by: None,
                        note: None,
                        decided_time: None,
                        detail: format!(
                            "POD {} from {device} for shipment {} at stop {}, which is not on {device}'s open shipments",
                            p.pod_id.as_str(),
                            p.shipment_id.as_str(),
                            p.stop_id.as_str()
                        ),
                    });
                }
            }
        }
        _ => {}
    }
    out
}

/// Whether a kind of event can make facts (the rest skip correlation entirely).
pub fn correlates(body: &Body) -> bool {
    match body {
        Body::Trip(t) => {
            matches!(t.kind, TripKind::Arrived | TripKind::Departed) && t.stop_id.is_some()
        }
        Body::Pod(_) => true,
        _ => false,
    }
}

/// The verdict on a DELIVERED POD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodVerdict {
    /// Every rule holds: POD_CONFIRMED.
    Confirmed,
    /// The evidence is declared but not all at the hub yet: wait.
    Waiting,
    /// A rule failed: review.
    Review(ReviewKind, String),
}

/// Judges a POD against its shipment: the policy's evidence (declared in the POD and
/// present at the hub: `have_blob`), its geo-stamp against the stop's fence, and that it
/// came after the vehicle's arrival at the stop (`facts`; by the device's own event order
/// when the POD's `pod_source` and the arrival are the same device and epoch, else by
/// capture time).
pub fn judge_pod(
    rec: &ShipmentRecord,
    facts: &[Fact],
    pod: &Pod,
    pod_time_ms: u64,
    pod_source: Option<&Source>,
    have_blob: &dyn Fn(&[u8; 32]) -> bool,
) -> PodVerdict {
    let policy = rec.spec.pod_policy;
    if policy.signature && pod.signature.is_none() {
        return PodVerdict::Review(
            ReviewKind::PodMissingEvidence,
            "no signature; the policy requires one".into(),
        );
    }
    if pod.photos.len() < usize::from(policy.min_photos) {
        return PodVerdict::Review(
            ReviewKind::PodMissingEvidence,
            format!(
                "{} photos; the policy requires at least {}",
                pod.photos.len(),
                policy.min_photos
            ),
        );
    }
    let Some(stop) = rec.spec.stops.iter().find(|s| s.id == pod.stop_id.as_str()) else {
        return PodVerdict::Review(
            ReviewKind::UnknownShipment,
            format!("stop {} is not the shipment's", pod.stop_id.as_str()),
        );
    };
    match pod.geo {
        None => {
            return PodVerdict::Review(
                ReviewKind::PodOutsideFence,
                "the POD has no geo-stamp".into(),
            );
        }
        Some(p) => {
            let off = outside_m(&stop.fence(), p.lat_e7, p.lon_e7);
            if off > POD_GEO_SLACK_M {
                return PodVerdict::Review(
                    ReviewKind::PodOutsideFence,
                    format!("geo-stamp {off:.0} m outside the fence of stop {}", stop.id),
                );
            }
        }
    }
    // "After the arrival" in the device's own order where it can tell (the same device
    // and epoch: its store numbers events as they happen, whatever its clocks say),
    // else by capture time.
    let arrived = facts.iter().any(|f| {
        f.classifier == Classifier::Actual
            && f.kind == FactType::Arrived
            && f.stop_id.as_deref() == Some(pod.stop_id.as_str())
            && match (&f.source, pod_source) {
                (
                    Source::Device { device, epoch, seq },
                    Some(Source::Device {
                        device: d,
                        epoch: e,
                        seq: s,
                    }),
                ) if device == d && epoch == e => seq < s,
                _ => f.event_time.0 <= pod_time_ms,
            }
    });
    if !arrived {
        return PodVerdict::Review(
            ReviewKind::PodBeforeArrival,
            format!(
                "no arrival of the vehicle at stop {} before the POD",
                stop.id
            ),
        );
    }
    let blobs_here = pod
        .signature
        .iter()
        .chain(pod.photos.iter())
        .all(|b| have_blob(&b.sha256));
    if !blobs_here {
        return PodVerdict::Waiting;
    }
    PodVerdict::Confirmed
}

/// Metres from a point to a fence (0 inside).
pub fn outside_m(fence: &Fence, lat_e7: i32, lon_e7: i32) -> f64 {
    let p = (f64::from(lat_e7) / 1e7, f64::from(lon_e7) / 1e7);
    match fence {
        Fence::Circle { center, radius_m } => {
            let c = (
                f64::from(center.lat_e7) / 1e7,
                f64::from(center.lon_e7) / 1e7,
            );
            (haversine_m(c, p) - f64::from(*radius_m)).max(0.0)
        }
        Fence::Polygon { points } => {
            // A local plane around the point: metres east and north.
            let k = 111_320.0;
            let xy =
                |lat: f64, lon: f64| ((lon - p.1) * k * p.0.to_radians().cos(), (lat - p.0) * k);
            let ring: Vec<(f64, f64)> = points
                .iter()
                .map(|q| xy(f64::from(q.lat_e7) / 1e7, f64::from(q.lon_e7) / 1e7))
                .collect();
            if ring.len() < 3 {
                return f64::INFINITY;
            }
            let mut inside = false;
            let mut best = f64::INFINITY;
            for i in 0..ring.len() {
                let (a, b) = (ring[i], ring[(i + 1) % ring.len()]);
                if (a.1 > 0.0) != (b.1 > 0.0) && 0.0 < a.0 + (0.0 - a.1) * (b.0 - a.0) / (b.1 - a.1)
                {
                    inside = !inside;
                }
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let len2 = dx * dx + dy * dy;
                let t = if len2 > 0.0 {
                    ((-a.0) * dx + (-a.1) * dy) / len2
                } else {
                    0.0
                }
                .clamp(0.0, 1.0);
                let (ex, ey) = (a.0 + t * dx, a.1 + t * dy);
                best = best.min((ex * ex + ey * ey).sqrt());
            }
            if inside { 0.0 } else { best }
        }
    }
}

/// Great-circle distance in metres between `(lat, lon)` points in degrees.
pub fn haversine_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let r = 6_371_008.8;
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * r * h.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetsync_protocol::{BoundedVec, Point};

    #[test]
    fn distances_to_fences() {
        let c = Fence::Circle {
            center: Point {
                lat_e7: 515_601_000,
                lon_e7: 50_831_000,
            },
            radius_m: 150,
        };
        assert_eq!(outside_m(&c, 515_601_000, 50_831_000), 0.0);
        // 0.01 degree of latitude is about 1112 m.
        let d = outside_m(&c, 515_701_000, 50_831_000);
        assert!((d - (1112.0 - 150.0)).abs() < 5.0, "{d}");
        let mut pts = BoundedVec::new();
        for (la, lo) in [(51.0, 5.0), (51.0, 5.01), (51.01, 5.01), (51.01, 5.0)] {
            let _ = pts.push(Point {
                lat_e7: (la * 1e7) as i32,
                lon_e7: (lo * 1e7) as i32,
            });
        }
        let poly = Fence::Polygon { points: pts };
        assert_eq!(outside_m(&poly, 510_050_000, 50_050_000), 0.0);
        let d = outside_m(&poly, 510_200_000, 50_050_000);
        assert!((d - 1112.0).abs() < 5.0, "{d}");
    }
}
