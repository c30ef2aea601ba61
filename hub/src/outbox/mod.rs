//! The transactional outbox: what each sink (an ERP, the partner webhooks) must hear,
//! written in the same store write as the fact that causes it. [`worker`] delivers a
//! sink's rows; [`erp`] and [`webhooks`] say what a delivery is.
//!
//! ```text
//! a new fact of shipment S (device event, ERP call, operator decision, estimate round)
//!   --the same store write--> one OutboxRow per configured sink:
//!     id  "{sink}/{S}/{fact id}"   the Idempotency-Key (webhook-id) for its whole life:
//!                                  retries and replays send it again, never a new one
//!     seq                          store order (per shipment, the order of its facts)
//!     state                        the shipment's state right after the fact
//! ```
//!
//! Which facts: the actual (ACT) facts but the ERP's own acts (CANCELLED and CLOSED come
//! from its calls), and arrival estimates (EST). Retractions are not sent: a rejected
//! review item withdraws a POD that was never confirmed.
//!
//! The webhooks get one row per fact in sink `webhooks` here, which their fan-out turns
//! into one row per matching subscription (see [`webhooks`]).
//!
//! Rows are keyed by their id, so writing a fact again (a redelivered device event, a
//! retried call) adds no row. On sled, where a write is not one transaction, rows are
//! written before the facts they announce and the facts before the record: a crash in
//! between is repaired by the redelivery or retry, which finds the rows already there.

pub mod erp;
pub mod webhooks;
pub mod worker;

use fleetsync_protocol::json::Time;
use serde::{Deserialize, Serialize};

use crate::shipments::{Classifier, Fact, FactType, ShipmentRecord, State};

/// One message for one sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Stable id: `{sink}/{shipment}/{fact id}`.
    pub id: String,
    /// The sink's name (an `[[erp]]` name).
    pub sink: String,
    /// Store order (assigned by the store).
    pub seq: u64,
    /// The shipment.
    pub shipment_id: String,
    /// Its customer.
    pub customer_id: String,
    /// The ERP's reference of it.
    pub reference: String,
    /// The fact announced.
    pub fact: Fact,
    /// The shipment's state right after the fact.
    pub state: State,
    /// When the row was written (ms).
    pub created_ms: u64,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not to be tried before (ms).
    #[serde(default)]
    pub next_ms: u64,
    /// What the last attempt got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What became of a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The sink has it (2xx, or 409: it had it already): the row goes.
    Done,
    /// Try again at `next_ms`.
    Retry {
        /// Not before (ms).
        next_ms: u64,
        /// What this attempt got.
        error: String,
    },
    /// Given up: the row becomes a dead letter.
    Dead {
        /// Why.
        error: String,
        /// The sink's answer, if it gave one (truncated).
        response: Option<String>,
    },
}

/// What the store keeps of a row after a delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// Nothing: it was delivered.
    Gone,
    /// The row, to be tried again.
    Waiting(OutboxRow),
    /// A dead letter instead of the row.
    Dead(DeadLetter),
}

impl OutboxRow {
    /// What `d` makes of this row at `now_ms`.
    pub fn settle(mut self, d: Delivery, now_ms: u64) -> Settled {
        match d {
            Delivery::Done => Settled::Gone,
            Delivery::Retry { next_ms, error } => {
                self.attempts += 1;
                self.next_ms = next_ms;
                self.last_error = Some(error);
                Settled::Waiting(self)
            }
            Delivery::Dead { error, response } => {
                self.attempts += 1;
                self.last_error = Some(error.clone());
                Settled::Dead(DeadLetter {
                    row: self,
                    error,
                    response,
                    dead_ms: now_ms,
                })
            }
        }
    }

    /// The row as a replay puts it back: untried, due now, same id.
    pub fn replayed(mut self) -> OutboxRow {
        self.attempts = 0;
        self.next_ms = 0;
        self.last_error = None;
        self
    }
}

/// A row given up on, kept for operators to look at and replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The row as it was (its id is kept by a replay).
    pub row: OutboxRow,
    /// Why it was given up.
    pub error: String,
    /// The sink's last answer (truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// When (ms).
    pub dead_ms: u64,
}

/// Whether sinks hear of a fact.
pub fn wanted(f: &Fact) -> bool {
    match f.classifier {
        Classifier::Actual => !matches!(
            f.kind,
            FactType::Retracted | FactType::Cancelled | FactType::Closed
        ),
        Classifier::Estimated => f.kind == FactType::Eta,
        Classifier::Planned => false,
    }
}

/// The row id of `fact` of `shipment` for `sink`.
pub fn row_id(sink: &str, shipment: &str, fact_id: &str) -> String {
    format!("{sink}/{shipment}/{fact_id}")
}

/// The rows `new_facts` of `rec` (as written with them) make for `sinks`, seq 0.
pub fn rows_for(
    sinks: &[String],
    rec: &ShipmentRecord,
    new_facts: &[Fact],
    now_ms: u64,
) -> Vec<OutboxRow> {
    let mut out = Vec::new();
    for f in new_facts.iter().filter(|f| wanted(f)) {
        // The correlation id (the fact's id: the device event's `device:epoch:seq` for
        // what a vehicle reported) follows the row to every sink's request: the
        // `outbox.deliver` span, X-Correlation-Id, the CloudEvent's `correlationid`.
        tracing::debug!(correlation_id = %f.id, shipment = %rec.id,
            milestone = f.kind.as_str(), sinks = sinks.len(), "outbox rows written");
    }
    for sink in sinks {
        for f in new_facts.iter().filter(|f| wanted(f)) {
            out.push(OutboxRow {
                id: row_id(sink, &rec.id, &f.id),
                sink: sink.clone(),
                seq: 0,
                shipment_id: rec.id.clone(),
                customer_id: rec.spec.customer_id.clone(),
                reference: rec.spec.reference.clone(),
                fact: f.clone(),
                state: rec.state,
                created_ms: now_ms,
                attempts: 0,
                next_ms: 0,
                last_error: None,
            });
        }
    }
    out
}

impl OutboxRow {
    /// When the fact happened.
    pub fn event_time(&self) -> Time {
        self.fact.event_time
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shipments::Source;

    fn fact(kind: FactType, classifier: Classifier, source: Source) -> Fact {
        Fact {
            id: "V1:1:7".into(),
            kind,
            classifier,
            stop_id: Some("C1".into()),
            event_time: Time(1),
            recorded_time: Time(2),
            source,
            retracts: None,
            note: None,
        }
    }

    #[test]
    fn sinks_hear_vehicle_and_operator_facts_and_estimates_only() {
        let dev = Source::Device {
            device: "V1".into(),
            epoch: 1,
            seq: 7,
        };
        let erp = Source::Erp {
            credential: "SAP".into(),
            version: 1,
        };
        let op = Source::Operator {
            credential: "Anna".into(),
        };
        assert!(wanted(&fact(
            FactType::Delivered,
            Classifier::Actual,
            dev.clone()
        )));
        assert!(wanted(&fact(
            FactType::PodConfirmed,
            Classifier::Actual,
            op
        )));
        assert!(wanted(&fact(
            FactType::Eta,
            Classifier::Estimated,
            dev.clone()
        )));
        assert!(wanted(&fact(
            FactType::Dispatched,
            Classifier::Actual,
            erp.clone()
        )));
        assert!(!wanted(&fact(FactType::Cancelled, Classifier::Actual, erp)));
        assert!(!wanted(&fact(
            FactType::Arrived,
            Classifier::Planned,
            dev.clone()
        )));
        assert!(!wanted(&fact(FactType::Retracted, Classifier::Actual, dev)));
    }
}
