//! Shipments: what the ERP releases, which vehicle carries it, and the facts that say
//! where it stands.
//!
//! ```text
//! PUT /v1/erp/shipments/{id} --spec--> plan_upsert (versions, 409 rules) --> store
//!     (record + facts + the ERP's location ids, one write) --> dispatch_vehicle: the
//!     vehicle's open shipments' stops, in planned order, as ONE Assignment version
//! device events --> (later) facts of the shipments assigned to that vehicle
//! state = facts::replay(facts)            (a cache of it is kept on the record)
//! ```
//!
//! A shipment's `version` counts the ERP's content changes (the same body again changes
//! nothing); its `rev` counts every write (content, cancel, close, assignment) and is
//! what concurrent writers compare-and-swap on. Planned milestones (classifier PLN) are
//! the current version's stop windows, derived when read, so an ERP change of a window
//! never leaves a stale plan behind.
//!
//! Stop ids are the ERP's location ids, shared by all shipments: the first shipment that
//! names an id fixes its fence; another fence under the same id is a 409, and the stops
//! of two shipments with the same id become one stop of the vehicle's assignment
//! carrying both shipments.

pub mod correlate;
pub mod eta;
pub mod facts;
pub mod service;
pub mod spec;

use std::collections::BTreeMap;

use fleetsync_protocol::json::Time;
use fleetsync_protocol::limits::{MAX_STOP_SHIPMENTS, MAX_STOPS};
use fleetsync_protocol::{Assignment, BoundedString, BoundedVec, Stop, Window};
use serde::{Deserialize, Serialize};

pub use facts::{Classifier, Fact, FactType, Mappings, Source, State};
pub use spec::{FieldError, ShipmentSpec, StopKind};

/// The id of every vehicle's assignment built from its shipments.
pub const PLAN_ASSIGNMENT_ID: &str = "shipments";

/// A shipment as the hub keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentRecord {
    /// The ERP's shipment id.
    pub id: String,
    /// Content version (counts the ERP's changes).
    pub version: u32,
    /// Write counter (compare-and-swap token).
    pub rev: u64,
    /// What the ERP sent last.
    pub spec: ShipmentSpec,
    /// The vehicle carrying it (the ERP's or an operator's choice).
    pub vehicle: Option<String>,
    /// The state its facts imply (cached; [`facts::replay`] is the truth).
    pub state: State,
    /// First seen (ms).
    pub created_ms: u64,
    /// Last written (ms).
    pub updated_ms: u64,
    /// The latest estimate per stop not reached yet ([`eta`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub estimates: BTreeMap<String, eta::StopEstimate>,
}

impl facts::StopKinds for ShipmentSpec {
    fn is_delivery(&self, stop: &str) -> bool {
        self.stops
            .iter()
            .any(|s| s.id == stop && s.kind == StopKind::Delivery)
    }
}

/// Why a shipment write is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 409 naming a field.
    Conflict(FieldError),
    /// 400 naming a field.
    Invalid(FieldError),
}

fn conflict(field: impl Into<String>, detail: impl Into<String>) -> Refusal {
    Refusal::Conflict(FieldError {
        field: field.into(),
        detail: detail.into(),
    })
}

/// What an upsert does.
#[derive(Debug, Clone, PartialEq)]
pub enum Upsert {
    /// The same body again: nothing changes.
    Unchanged(ShipmentRecord),
    /// A new record or version to write (compare-and-swap on `expected_rev`).
    Write {
        /// The record to write.
        record: ShipmentRecord,
        /// The rev the stored record must still have (`None`: must not exist).
        expected_rev: Option<u64>,
        /// Whether this is a new shipment.
        created: bool,
    },
}

/// Stops a vehicle has finished: a departure, delivery or failed delivery there.
pub fn completed_stops(facts: &[Fact]) -> std::collections::BTreeSet<String> {
    facts
        .iter()
        .filter(|f| {
            f.classifier == Classifier::Actual
                && matches!(
                    f.kind,
                    FactType::Departed | FactType::Delivered | FactType::DeliveryFailed
                )
        })
        .filter_map(|f| f.stop_id.clone())
        .collect()
}

/// Decides what `PUT /v1/erp/shipments/{id}` with `spec` does to what is stored.
pub fn plan_upsert(
    id: &str,
    current: Option<(&ShipmentRecord, &[Fact])>,
    spec: ShipmentSpec,
    now_ms: u64,
) -> Result<Upsert, Refusal> {
    spec::check_id("id", id).map_err(Refusal::Invalid)?;
    spec.validate().map_err(Refusal::Invalid)?;
    let Some((cur, facts)) = current else {
        return Ok(Upsert::Write {
            record: ShipmentRecord {
                id: id.to_string(),
                version: 1,
                rev: 1,
                vehicle: spec.vehicle.clone(),
                spec,
                state: State::Created,
                created_ms: now_ms,
                updated_ms: now_ms,
                estimates: BTreeMap::new(),
            },
            expected_rev: None,
            created: true,
        });
    };
    if cur.spec == spec {
        return Ok(Upsert::Unchanged(cur.clone()));
    }
    if cur.spec.customer_id != spec.customer_id {
        return Err(conflict(
            "customer_id",
            format!(
                "the shipment belongs to customer {:?}; a shipment cannot change customer",
                cur.spec.customer_id
            ),
        ));
    }
    if matches!(cur.state, State::Cancelled | State::Closed) {
        return Err(conflict(
            "body",
            format!(
                "the shipment is {}; it cannot change any more",
                cur.state.as_str()
            ),
        ));
    }
    let done = completed_stops(facts);
    for stop in &cur.spec.stops {
        if done.contains(&stop.id) && spec.stops.iter().find(|s| s.id == stop.id) != Some(stop) {
            return Err(conflict(
                "stops",
                format!(
                    "stop {:?} is already completed by the vehicle; it cannot change or go",
                    stop.id
                ),
            ));
        }
    }
    let vehicle = spec.vehicle.clone().or_else(|| cur.vehicle.clone());
    Ok(Upsert::Write {
        record: ShipmentRecord {
            id: cur.id.clone(),
            version: cur.version + 1,
            rev: cur.rev + 1,
            vehicle,
            spec,
            state: cur.state,
            created_ms: cur.created_ms,
            updated_ms: now_ms,
            estimates: cur.estimates.clone(),
        },
        expected_rev: Some(cur.rev),
        created: false,
    })
}

/// The planned milestones of the current version: one PLN ARRIVED per stop window.
pub fn planned(rec: &ShipmentRecord) -> Vec<Fact> {
    rec.spec
        .stops
        .iter()
        .filter_map(|s| {
            let w = s.window?;
            Some(Fact {
                id: format!("pln:{}", s.id),
                kind: FactType::Arrived,
                classifier: Classifier::Planned,
                stop_id: Some(s.id.clone()),
                event_time: w.start,
                recorded_time: Time(rec.updated_ms),
                source: Source::Erp {
                    credential: String::new(),
                    version: rec.version,
                },
                retracts: None,
                note: None,
            })
        })
        .collect()
}

/// Builds a vehicle's assignment (version `version`) from its open shipments: their
/// stops in planned order (by each shipment's earliest window, then id), one stop per
/// ERP location id carrying every shipment that goes there; stops already completed
/// for every shipment at them are left out.
pub fn build_assignment(
    open: &[(ShipmentRecord, Vec<Fact>)],
    version: u32,
) -> Result<Assignment, String> {
    let mut order: Vec<&(ShipmentRecord, Vec<Fact>)> = open.iter().collect();
    order.sort_by_key(|(r, _)| {
        let first = r
            .spec
            .stops
            .iter()
            .filter_map(|s| s.window.map(|w| w.start))
            .min()
            .unwrap_or(Time(u64::MAX));
        (first, r.created_ms, r.id.clone())
    });
    // stop id -> (position, stop spec, shipment ids)
    let mut stops: BTreeMap<String, (usize, &spec::StopSpec, Vec<String>)> = BTreeMap::new();
    let mut next = 0usize;
    for (rec, facts) in order {
        let done = completed_stops(facts);
        for s in &rec.spec.stops {
            if done.contains(&s.id) {
                continue;
            }
            let e = stops.entry(s.id.clone()).or_insert_with(|| {
                next += 1;
                (next, s, Vec::new())
            });
            e.2.push(rec.id.clone());
        }
    }
    let mut list: Vec<(usize, &spec::StopSpec, Vec<String>)> = stops.into_values().collect();
    list.sort_by_key(|(pos, _, _)| *pos);
    if list.len() > MAX_STOPS {
        return Err(format!(
            "the vehicle's open shipments have {} stops; an assignment carries at most {MAX_STOPS}",
            list.len()
        ));
    }
    let mut out = BoundedVec::new();
    for (_, s, ids) in list {
        if ids.len() > MAX_STOP_SHIPMENTS {
            return Err(format!(
                "stop {:?} has {} shipments; an assignment stop carries at most {MAX_STOP_SHIPMENTS}",
                s.id,
                ids.len()
            ));
        }
        let mut shipment_ids = BoundedVec::new();
        for id in &ids {
            let id = BoundedString::try_from_str(id)
                .map_err(|_| format!("shipment id {id:?} too long"))?;
            let _ = shipment_ids.push(id);
        }
        let stop = Stop {
            id: BoundedString::try_from_str(&s.id)
                .map_err(|_| format!("stop id {:?} too long", s.id))?,
            name: BoundedString::try_from_str(&s.name)
                .map_err(|_| format!("stop name {:?} too long", s.name))?,
            address: BoundedString::try_from_str(&s.address)
                .map_err(|_| format!("stop address of {:?} too long", s.id))?,
            shipment_ids,
            fence: s.fence(),
            window: s.window.map(|w| Window {
                start_ms: w.start.0,
                end_ms: w.end.0,
            }),
        };
        let _ = out.push(stop);
    }
    Ok(Assignment {
        id: BoundedString::try_from_str(PLAN_ASSIGNMENT_ID).map_err(|_| "id".to_string())?,
        version,
        stops: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::*;

    pub(crate) fn spec(customer: &str, stops: &[(&str, StopKind, f64)]) -> ShipmentSpec {
        ShipmentSpec {
            reference: "SO-1".into(),
            customer_id: customer.into(),
            vehicle: Some("VAN-1".into()),
            stops: stops
                .iter()
                .map(|(id, kind, lat)| StopSpec {
                    id: (*id).into(),
                    kind: *kind,
                    name: format!("stop {id}"),
                    address: String::new(),
                    location: Some(LatLon {
                        lat: *lat,
                        lon: 5.0,
                    }),
                    radius_m: None,
                    polygon: None,
                    window: None,
                })
                .collect(),
            pod_policy: PodPolicy::default(),
            lines: vec![],
        }
    }

    #[test]
    fn versions_conflicts_and_unchanged() {
        let s = spec(
            "ACME",
            &[
                ("P1", StopKind::Pickup, 51.0),
                ("D1", StopKind::Delivery, 52.0),
            ],
        );
        let Upsert::Write {
            record,
            created: true,
            ..
        } = plan_upsert("S1", None, s.clone(), 5).unwrap()
        else {
            panic!()
        };
        assert_eq!(record.version, 1);
        assert!(matches!(
            plan_upsert("S1", Some((&record, &[])), s.clone(), 6),
            Ok(Upsert::Unchanged(_))
        ));
        let mut other = s.clone();
        other.customer_id = "BETA".into();
        assert!(
            matches!(plan_upsert("S1", Some((&record, &[])), other, 6), Err(Refusal::Conflict(e)) if e.field == "customer_id")
        );
        let mut moved = s.clone();
        moved.stops[0].location = Some(LatLon {
            lat: 51.1,
            lon: 5.0,
        });
        let Ok(Upsert::Write {
            record: v2,
            expected_rev: Some(1),
            ..
        }) = plan_upsert("S1", Some((&record, &[])), moved.clone(), 7)
        else {
            panic!()
        };
        assert_eq!((v2.version, v2.rev), (2, 2));
        let departed = Fact {
            id: "f".into(),
            kind: FactType::Departed,
            classifier: Classifier::Actual,
            stop_id: Some("P1".into()),
            event_time: Time(1),
            recorded_time: Time(1),
            source: Source::Operator {
                credential: "x".into(),
            },
            retracts: None,
            note: None,
        };
        let mut again = moved.clone();
        again.stops[0].name = "renamed".into();
        assert!(
            matches!(plan_upsert("S1", Some((&v2, &[departed])), again, 8), Err(Refusal::Conflict(e)) if e.field == "stops")
        );
        let mut empty = s.clone();
        empty.stops.clear();
        assert!(
            matches!(plan_upsert("S2", None, empty, 1), Err(Refusal::Invalid(e)) if e.field == "stops")
        );
    }

    #[test]
    fn one_assignment_stop_per_location() {
        let a = spec(
            "ACME",
            &[
                ("P1", StopKind::Pickup, 51.0),
                ("D1", StopKind::Delivery, 52.0),
            ],
        );
        let b = spec(
            "BETA",
            &[
                ("P1", StopKind::Pickup, 51.0),
                ("D2", StopKind::Delivery, 53.0),
            ],
        );
        let rec = |id: &str, s: ShipmentSpec, t: u64| ShipmentRecord {
            id: id.into(),
            version: 1,
            rev: 1,
            vehicle: Some("VAN-1".into()),
            spec: s,
            state: State::Created,
            created_ms: t,
            updated_ms: t,
            estimates: BTreeMap::new(),
        };
        let open = vec![(rec("S1", a, 1), vec![]), (rec("S2", b, 2), vec![])];
        let asg = build_assignment(&open, 3).unwrap();
        let ids: Vec<&str> = asg.stops.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["P1", "D1", "D2"]);
        assert_eq!(asg.stops[0].shipment_ids.len(), 2);
        assert_eq!(asg.version, 3);
    }
}
