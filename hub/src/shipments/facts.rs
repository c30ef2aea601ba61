//! Milestone facts and the state they imply.
//!
//! A fact is immutable: `{id, type, classifier, stop_id, event_time, recorded_time,
//! source}`. Its id is derived from its source (a device event's `device:epoch:seq`, an
//! ERP call's shipment version, an operator decision's review id), so recording the same
//! source twice records one fact. Corrections are `RETRACTED` facts naming the fact they
//! withdraw, never edits.
//!
//! State is [`replay`]: the `ACT` facts not retracted, in `event_time` order (then by
//! type, then id, so the order is total and arrival order never matters), folded through
//! the transitions below. A POD that arrives after a 6-hour outage sorts by its capture
//! time, before whatever the vehicle did afterwards.
//!
//! ```text
//! CREATED --DISPATCHED--> PLANNED --DEPARTED--> IN_TRANSIT --ARRIVED(delivery)--> AT_DESTINATION
//!   --DELIVERED--> DELIVERED --POD_CONFIRMED--> POD_CONFIRMED --CLOSED--> CLOSED
//! any open --DELIVERY_FAILED--> DELIVERY_FAILED --DEPARTED--> RETURNING --RETURNED--> RETURNED
//! not yet delivered --CANCELLED--> CANCELLED; CLOSED ends every state
//! ```
//!
//! A fact that does not apply in the state reached (an ARRIVED after DELIVERED: the
//! vehicle came back) changes nothing; it stays in the timeline.

use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

/// What a fact says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FactType {
    /// Sent to a vehicle as part of its assignment.
    Dispatched,
    /// The vehicle left a stop.
    Departed,
    /// The vehicle reached a stop.
    Arrived,
    /// Handed over (a POD with outcome delivered, damaged or partial).
    Delivered,
    /// Not handed over (a POD with outcome refused).
    DeliveryFailed,
    /// The POD's evidence meets the policy (or an operator accepted it): billing may go.
    PodConfirmed,
    /// Goods back at the origin.
    Returned,
    /// The ERP cancelled it.
    Cancelled,
    /// The ERP closed it.
    Closed,
    /// An estimate of the arrival at a stop (classifier EST).
    Eta,
    /// Withdraws the fact named in `retracts`.
    Retracted,
}

impl FactType {
    /// The type's name in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FactType::Dispatched => "DISPATCHED",
            FactType::Departed => "DEPARTED",
            FactType::Arrived => "ARRIVED",
            FactType::Delivered => "DELIVERED",
            FactType::DeliveryFailed => "DELIVERY_FAILED",
            FactType::PodConfirmed => "POD_CONFIRMED",
            FactType::Returned => "RETURNED",
            FactType::Cancelled => "CANCELLED",
            FactType::Closed => "CLOSED",
            FactType::Eta => "ETA",
            FactType::Retracted => "RETRACTED",
        }
    }
}

/// Planned, estimated or actual.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Classifier {
    /// Planned (from the ERP's windows).
    #[serde(rename = "PLN")]
    Planned,
    /// Estimated.
    #[serde(rename = "EST")]
    Estimated,
    /// Actual.
    #[serde(rename = "ACT")]
    Actual,
}

/// Where a fact comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A device event.
    Device {
        /// Device id.
        device: String,
        /// Its epoch.
        epoch: u32,
        /// Its sequence number.
        seq: u64,
    },
    /// An ERP call: the shipment version it made.
    Erp {
        /// The credential's name.
        credential: String,
        /// The shipment version.
        version: u32,
    },
    /// An operator.
    Operator {
        /// The credential's name.
        credential: String,
    },
}

/// One fact about one shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// Stable id, derived from the source (see the module note).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: FactType,
    /// Planned, estimated or actual.
    pub classifier: Classifier,
    /// The stop it happened at, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_id: Option<String>,
    /// When it happened (the vehicle's clock at capture for device facts).
    pub event_time: Time,
    /// When the hub recorded it.
    pub recorded_time: Time,
    /// Where it comes from.
    pub source: Source,
    /// For RETRACTED: the fact withdrawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retracts: Option<String>,
    /// Why (a cancel reason, a review note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The canonical shipment states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Known, not yet on a vehicle.
    Created,
    /// On a vehicle's assignment.
    Planned,
    /// On its way.
    InTransit,
    /// At the delivery stop.
    AtDestination,
    /// Handed over.
    Delivered,
    /// Handed over with the evidence the policy asks: billing may go.
    PodConfirmed,
    /// Done in the ERP.
    Closed,
    /// Not handed over.
    DeliveryFailed,
    /// On its way back.
    Returning,
    /// Back at the origin.
    Returned,
    /// Cancelled by the ERP.
    Cancelled,
}

/// Every state, in the mapping tables' order.
pub const STATES: [State; 11] = [
    State::Created,
    State::Planned,
    State::InTransit,
    State::AtDestination,
    State::Delivered,
    State::PodConfirmed,
    State::Closed,
    State::DeliveryFailed,
    State::Returning,
    State::Returned,
    State::Cancelled,
];

impl State {
    /// The state's name in JSON and query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "CREATED",
            State::Planned => "PLANNED",
            State::InTransit => "IN_TRANSIT",
            State::AtDestination => "AT_DESTINATION",
            State::Delivered => "DELIVERED",
            State::PodConfirmed => "POD_CONFIRMED",
            State::Closed => "CLOSED",
            State::DeliveryFailed => "DELIVERY_FAILED",
            State::Returning => "RETURNING",
            State::Returned => "RETURNED",
            State::Cancelled => "CANCELLED",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<State> {
        STATES.iter().copied().find(|st| st.as_str() == s)
    }

    /// No more vehicle work: the shipment leaves its vehicle's assignment.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            State::Delivered
                | State::PodConfirmed
                | State::Closed
                | State::Returned
                | State::Cancelled
        )
    }
}

/// Which stops of the shipment are deliveries (an arrival there is AT_DESTINATION).
pub trait StopKinds {
    /// Whether `stop` is a delivery stop of the shipment.
    fn is_delivery(&self, stop: &str) -> bool;
}

/// One transition of the fold.
fn step(state: State, f: &Fact, stops: &dyn StopKinds) -> State {
    use State::*;
    let at_delivery = f.stop_id.as_deref().is_some_and(|s| stops.is_delivery(s));
    match (f.kind, state) {
        (FactType::Closed, _) => Closed,
        (_, Closed) => Closed,
        (FactType::Cancelled, Created | Planned | InTransit | AtDestination) => Cancelled,
        (_, Cancelled) => Cancelled,
        (FactType::Dispatched, Created) => Planned,
        (FactType::Departed, Created | Planned) => InTransit,
        (FactType::Departed, DeliveryFailed) => Returning,
        (FactType::Arrived, Created | Planned | InTransit) if at_delivery => AtDestination,
        (FactType::Delivered, Created | Planned | InTransit | AtDestination | DeliveryFailed) => {
            Delivered
        }
        (FactType::DeliveryFailed, Created | Planned | InTransit | AtDestination) => DeliveryFailed,
        (FactType::PodConfirmed, Delivered) => PodConfirmed,
        (FactType::Returned, DeliveryFailed | Returning) => Returned,
        (_, s) => s,
    }
}

/// Sort key of a fact: event time, then type, then id (a total order).
fn order(f: &Fact) -> (Time, FactType, &str) {
    (f.event_time, f.kind, f.id.as_str())
}

/// The state the facts imply, whatever their order or repetition.
pub fn replay(facts: &[Fact], stops: &dyn StopKinds) -> State {
    let retracted: std::collections::HashSet<&str> = facts
        .iter()
        .filter(|f| f.kind == FactType::Retracted)
        .filter_map(|f| f.retracts.as_deref())
        .collect();
    let mut act: Vec<&Fact> = facts
        .iter()
        .filter(|f| f.classifier == Classifier::Actual && !retracted.contains(f.id.as_str()))
        .collect();
    act.sort_by(|a, b| order(a).cmp(&order(b)));
    act.dedup_by(|a, b| a.id == b.id);
    act.into_iter()
        .fold(State::Created, |s, f| step(s, f, stops))
}

/// The timeline: every fact once, in event-time order.
pub fn timeline(facts: &[Fact]) -> Vec<Fact> {
    let mut v: Vec<Fact> = facts.to_vec();
    v.sort_by(|a, b| order(a).cmp(&order(b)));
    v.dedup_by(|a, b| a.id == b.id);
    v
}

/// A state's names outside the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Canonical state.
    pub state: State,
    /// The ERP's status.
    pub erp_status: String,
    /// What the portal shows.
    pub portal_status: String,
    /// The webhook event type sent on entering it.
    pub webhook_type: String,
    /// Whether entering it releases billing.
    pub releases_billing: bool,
}

/// The versioned mapping tables (`GET /v1/erp/mappings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mappings {
    /// Version: every outbound message names the one it used.
    pub version: String,
    /// One row per state.
    pub states: Vec<Mapping>,
}

impl Default for Mappings {
    fn default() -> Self {
        let row = |state: State, erp: &str, portal: &str, hook: &str, bill: bool| Mapping {
            state,
            erp_status: erp.into(),
            portal_status: portal.into(),
            webhook_type: hook.into(),
            releases_billing: bill,
        };
        Mappings {
            version: "builtin-1".into(),
            states: vec![
                row(
                    State::Created,
                    "OPEN",
                    "Order received",
                    "shipment.created.v1",
                    false,
                ),
                row(
                    State::Planned,
                    "RELEASED",
                    "Planned",
                    "shipment.planned.v1",
                    false,
                ),
                row(
                    State::InTransit,
                    "IN_TRANSIT",
                    "On its way",
                    "shipment.in_transit.v1",
                    false,
                ),
                row(
                    State::AtDestination,
                    "IN_TRANSIT",
                    "Arriving",
                    "shipment.arrived.v1",
                    false,
                ),
                row(
                    State::Delivered,
                    "DELIVERED",
                    "Delivered",
                    "shipment.delivered.v1",
                    false,
                ),
                row(
                    State::PodConfirmed,
                    "INVOICE_READY",
                    "Delivered",
                    "shipment.pod_confirmed.v1",
                    true,
                ),
                row(
                    State::Closed,
                    "CLOSED",
                    "Completed",
                    "shipment.closed.v1",
                    false,
                ),
                row(
                    State::DeliveryFailed,
                    "DELIVERY_FAILED",
                    "Delivery attempt failed",
                    "shipment.delivery_failed.v1",
                    false,
                ),
                row(
                    State::Returning,
                    "RETURNING",
                    "Returning to sender",
                    "shipment.returning.v1",
                    false,
                ),
                row(
                    State::Returned,
                    "RETURNED",
                    "Returned to sender",
                    "shipment.returned.v1",
                    false,
                ),
                row(
                    State::Cancelled,
                    "CANCELLED",
                    "Cancelled",
                    "shipment.cancelled.v1",
                    false,
                ),
            ],
        }
    }
}

impl Mappings {
    /// The row of `state`.
    pub fn of(&self, state: State) -> Option<&Mapping> {
        self.states.iter().find(|m| m.state == state)
    }

    /// Checks that every state has exactly one row.
    pub fn validate(&self) -> Result<(), String> {
        for s in STATES {
            let n = self.states.iter().filter(|m| m.state == s).count();
            if n != 1 {
                return Err(format!(
                    "state {} has {n} rows; every state needs exactly one",
                    s.as_str()
                ));
            }
        }
        if self.version.trim().is_empty() {
            return Err("version: must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Deliveries;
    impl StopKinds for Deliveries {
        fn is_delivery(&self, stop: &str) -> bool {
            stop.starts_with('D')
        }
    }

    fn fact(id: &str, kind: FactType, stop: Option<&str>, t: u64) -> Fact {
        Fact {
            id: id.into(),
            kind,
            classifier: Classifier::Actual,
            stop_id: stop.map(str::to_string),
            event_time: Time(t),
            recorded_time: Time(t + 1000),
            source: Source::Device {
                device: "V1".into(),
                epoch: 1,
                seq: t,
            },
            retracts: None,
            note: None,
        }
    }

    fn delivery_run() -> Vec<Fact> {
        vec![
            fact("d", FactType::Dispatched, None, 10),
            fact("p", FactType::Departed, Some("P1"), 20),
            fact("a", FactType::Arrived, Some("D1"), 30),
            fact("v", FactType::Delivered, Some("D1"), 40),
            fact("c", FactType::PodConfirmed, Some("D1"), 40),
            fact("x", FactType::Departed, Some("D1"), 50),
            fact("y", FactType::Arrived, Some("D1"), 60),
        ]
    }

    #[test]
    fn the_happy_path_and_late_arrivals() {
        assert_eq!(replay(&delivery_run(), &Deliveries), State::PodConfirmed);
        // A POD that arrives after an outage still sorts by its capture time.
        let mut late = delivery_run();
        late.rotate_left(3);
        assert_eq!(replay(&late, &Deliveries), State::PodConfirmed);
        // Arrival at a pickup is not at destination.
        let f = [
            fact("d", FactType::Dispatched, None, 1),
            fact("a", FactType::Arrived, Some("P1"), 2),
        ];
        assert_eq!(replay(&f, &Deliveries), State::Planned);
    }

    #[test]
    fn failures_returns_cancel_close_and_retractions() {
        let f = [
            fact("d", FactType::Dispatched, None, 1),
            fact("r", FactType::DeliveryFailed, Some("D1"), 2),
            fact("x", FactType::Departed, Some("D1"), 3),
        ];
        assert_eq!(replay(&f, &Deliveries), State::Returning);
        let mut g = f.to_vec();
        g.push(fact("b", FactType::Returned, Some("P1"), 4));
        assert_eq!(replay(&g, &Deliveries), State::Returned);
        let c = [
            fact("d", FactType::Dispatched, None, 1),
            fact("c", FactType::Cancelled, None, 2),
        ];
        assert_eq!(replay(&c, &Deliveries), State::Cancelled);
        let mut v = delivery_run();
        v.push(fact("z", FactType::Cancelled, None, 99));
        assert_eq!(
            replay(&v, &Deliveries),
            State::PodConfirmed,
            "no cancel after delivery"
        );
        v.push(fact("k", FactType::Closed, None, 100));
        assert_eq!(replay(&v, &Deliveries), State::Closed);
        let mut r = delivery_run();
        let mut retract = fact("n", FactType::Retracted, Some("D1"), 41);
        retract.retracts = Some("c".into());
        r.push(retract);
        assert_eq!(replay(&r, &Deliveries), State::Delivered);
        let mut est = fact("e", FactType::Arrived, Some("D1"), 5);
        est.classifier = Classifier::Planned;
        assert_eq!(
            replay(
                &[fact("d", FactType::Dispatched, None, 1), est],
                &Deliveries
            ),
            State::Planned
        );
    }

    proptest! {
        /// Any permutation and any duplication of the same facts: the same state and
        /// the same timeline.
        #[test]
        fn order_and_repetition_do_not_matter(
            perm in Just(delivery_run()).prop_shuffle(),
            dups in proptest::collection::vec(0usize..7, 0..10),
        ) {
            let base = delivery_run();
            let mut facts = perm.clone();
            for i in dups {
                facts.push(base[i].clone());
            }
            prop_assert_eq!(replay(&facts, &Deliveries), replay(&base, &Deliveries));
            prop_assert_eq!(timeline(&facts), timeline(&base));
        }
    }
}
