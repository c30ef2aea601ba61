//! The shipment use cases over the store and dispatch: upsert, cancel, close, assign,
//! and keeping each vehicle's assignment equal to its open shipments.
//!
//! Every write is a compare-and-swap on the record's `rev`, retried on a lost race with a
//! fresh read, so two ERP calls (or two hubs) on one shipment never overwrite each other.
//! After a write, the vehicles it touches are dispatched again: their assignment is
//! rebuilt from the store and sent as a new version only if its stops changed. A crash
//! between the two leaves a stale assignment that the next write for that vehicle, or
//! [`Shipments::reconcile`] at start, repairs.

use fleetsync_protocol::json::Time;

use std::collections::{BTreeMap, BTreeSet};

use super::correlate::{PodVerdict, ReviewItem, ReviewKind, ReviewStatus, judge_pod, source_id};
use super::eta::{self, EtaSettings, VehiclePosition};
use super::facts::{self, Classifier, Fact, FactType, Mappings, Source, State};
use super::{
    FieldError, Refusal, ShipmentRecord, ShipmentSpec, Upsert, build_assignment, plan_upsert,
};
use crate::dispatch::{AssignError, Dispatch};
use crate::store::{PutShipment, ShipmentQuery, ShipmentWrite, Store, StoreError};

/// Attempts of a compare-and-swap write before giving up.
const CAS_ATTEMPTS: usize = 8;

/// Why a shipment call failed.
#[derive(Debug)]
pub enum ShipmentError {
    /// The request is wrong (400).
    Invalid(FieldError),
    /// It conflicts with what is stored (409).
    Conflict(FieldError),
    /// No such shipment (404).
    NotFound,
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for ShipmentError {
    fn from(e: StoreError) -> Self {
        ShipmentError::Store(e)
    }
}

impl From<Refusal> for ShipmentError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid(e) => ShipmentError::Invalid(e),
            Refusal::Conflict(e) => ShipmentError::Conflict(e),
        }
    }
}

fn field(f: &str, d: impl Into<String>) -> FieldError {
    FieldError {
        field: f.into(),
        detail: d.into(),
    }
}

/// A compare-and-swap that kept losing to other writers.
fn busy(f: &str) -> ShipmentError {
    ShipmentError::Conflict(field(
        f,
        "the shipment is being changed by other calls at the same time; try again",
    ))
}

/// What an upsert did.
#[derive(Debug, Clone)]
pub struct Upserted {
    /// The shipment as stored.
    pub record: ShipmentRecord,
    /// Made now.
    pub created: bool,
}

/// The shipment use cases.
#[derive(Debug, Clone)]
pub struct Shipments {
    store: Store,
    dispatch: Dispatch,
    mappings: Mappings,
}

impl Shipments {
    /// Writes `rec` (and `facts`) if the stored rev is still `expected`; whether it was.
    async fn swap(
        &self,
        rec: &ShipmentRecord,
        expected: u64,
        facts: &[Fact],
    ) -> Result<bool, ShipmentError> {
        match self
            .store
            .put_shipment(rec, Some(expected), facts, &[])
            .await?
        {
            PutShipment::Written => Ok(true),
            PutShipment::Stale => Ok(false),
            PutShipment::LocationConflict { .. } => Err(ShipmentError::Store(StoreError::Task(
                "a write without locations reported a location conflict".into(),
            ))),
        }
    }

    /// Shipments over `store`, sending assignments through `dispatch`.
    pub fn new(store: Store, dispatch: Dispatch, mappings: Mappings) -> Self {
        Shipments {
            store,
            dispatch,
            mappings,
        }
    }

    /// The mapping tables in force.
    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn check_vehicle(&self, vehicle: &str) -> Result<(), ShipmentError> {
        if self.store.device(vehicle).await?.is_none() {
            return Err(ShipmentError::Invalid(field(
                "vehicle",
                format!(
                    "no device {vehicle:?} has connected to this hub yet; check the id, or start its gateway first"
                ),
            )));
        }
        Ok(())
    }

    /// `PUT /v1/erp/shipments/{id}`.
    pub async fn upsert(
        &self,
        id: &str,
        spec: ShipmentSpec,
        credential: &str,
        now_ms: u64,
    ) -> Result<Upserted, ShipmentError> {
        if let Some(v) = &spec.vehicle {
            spec.validate().map_err(ShipmentError::Invalid)?;
            self.check_vehicle(v).await?;
        }
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.shipment(id).await?;
            let plan = plan_upsert(
                id,
                current.as_ref().map(|(r, f)| (r, f.as_slice())),
                spec.clone(),
                now_ms,
            )?;
            let (mut record, expected_rev, created) = match plan {
                Upsert::Unchanged(record) => {
                    return Ok(Upserted {
                        record,
                        created: false,
                    });
                }
                Upsert::Write {
                    record,
                    expected_rev,
                    created,
                } => (record, expected_rev, created),
            };
            let old_vehicle = current.as_ref().and_then(|(r, _)| r.vehicle.clone());
            let facts = current.map(|(_, f)| f).unwrap_or_default();
            record.state = facts::replay(&facts, &record.spec);
            let locations: Vec<(String, fleetsync_protocol::Fence)> = record
                .spec
                .stops
                .iter()
                .map(|s| (s.id.clone(), s.fence()))
                .collect();
            match self
                .store
                .put_shipment(&record, expected_rev, &[], &locations)
                .await?
            {
                PutShipment::Written => {}
                PutShipment::Stale => continue,
                PutShipment::LocationConflict { stop_id } => {
                    let i = record
                        .spec
                        .stops
                        .iter()
                        .position(|s| s.id == stop_id)
                        .unwrap_or(0);
                    return Err(ShipmentError::Conflict(field(
                        &format!("stops[{i}].id"),
                        format!(
                            "location {stop_id:?} is already known with another place (location, radius or polygon); the same ERP location id is the same place in every shipment"
                        ),
                    )));
                }
            }
            let source = Source::Erp {
                credential: credential.to_string(),
                version: record.version,
            };
            self.redispatch(&record, old_vehicle.as_deref(), source, now_ms)
                .await?;
            let record = self
                .store
                .shipment(id)
                .await?
                .map(|(r, _)| r)
                .unwrap_or(record);
            return Ok(Upserted { record, created });
        }
        Err(busy("body"))
    }

    /// Adds `fact` to shipment `id` if `allowed(state)`; `Ok(false)` if it was there.
    async fn add_fact(
        &self,
        id: &str,
        fact: Fact,
        allowed: impl Fn(State) -> Result<(), FieldError>,
        now_ms: u64,
    ) -> Result<ShipmentRecord, ShipmentError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((cur, mut facts)) = self.store.shipment(id).await? else {
                return Err(ShipmentError::NotFound);
            };
            if facts.iter().any(|f| f.id == fact.id) {
                return Ok(cur);
            }
            allowed(cur.state).map_err(ShipmentError::Conflict)?;
            facts.push(fact.clone());
            let mut rec = cur.clone();
            rec.rev += 1;
            rec.updated_ms = now_ms;
            rec.state = facts::replay(&facts, &rec.spec);
            if self
                .swap(&rec, cur.rev, std::slice::from_ref(&fact))
                .await?
            {
                return Ok(rec);
            }
        }
        Err(busy("body"))
    }

    /// `POST /v1/erp/shipments/{id}/cancel`.
    pub async fn cancel(
        &self,
        id: &str,
        reason: String,
        credential: &str,
        now_ms: u64,
    ) -> Result<ShipmentRecord, ShipmentError> {
        let Some((cur, _)) = self.store.shipment(id).await? else {
            return Err(ShipmentError::NotFound);
        };
        let fact = erp_fact(
            "cancelled",
            FactType::Cancelled,
            &cur,
            credential,
            now_ms,
            Some(reason),
        );
        let rec = self
            .add_fact(
                id,
                fact,
                |s| match s {
                    State::Created | State::Planned | State::InTransit | State::AtDestination => Ok(()),
                    s => Err(field("body", format!("the shipment is {}; only a shipment not yet delivered can be cancelled", s.as_str()))),
                },
                now_ms,
            )
            .await?;
        self.redispatch(
            &rec,
            None,
            Source::Erp {
                credential: credential.into(),
                version: rec.version,
            },
            now_ms,
        )
        .await?;
        Ok(rec)
    }

    /// `POST /v1/erp/shipments/{id}/close`.
    pub async fn close(
        &self,
        id: &str,
        credential: &str,
        now_ms: u64,
    ) -> Result<ShipmentRecord, ShipmentError> {
        let Some((cur, _)) = self.store.shipment(id).await? else {
            return Err(ShipmentError::NotFound);
        };
        let fact = erp_fact("closed", FactType::Closed, &cur, credential, now_ms, None);
        let rec = self.add_fact(id, fact, |_| Ok(()), now_ms).await?;
        self.redispatch(
            &rec,
            None,
            Source::Erp {
                credential: credential.into(),
                version: rec.version,
            },
            now_ms,
        )
        .await?;
        Ok(rec)
    }

    /// `POST /v1/ops/shipments/{id}/assign`.
    pub async fn assign(
        &self,
        id: &str,
        vehicle: &str,
        credential: &str,
        now_ms: u64,
    ) -> Result<ShipmentRecord, ShipmentError> {
        fleetsync_protocol::topic::validate_device_id(vehicle)
            .map_err(|e| ShipmentError::Invalid(field("vehicle", format!("{vehicle:?}: {e}"))))?;
        self.check_vehicle(vehicle).await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some((cur, facts)) = self.store.shipment(id).await? else {
                return Err(ShipmentError::NotFound);
            };
            if cur.state.is_finished() {
                return Err(ShipmentError::Conflict(field(
                    "vehicle",
                    format!(
                        "the shipment is {}; it has no vehicle work left",
                        cur.state.as_str()
                    ),
                )));
            }
            if cur.vehicle.as_deref() == Some(vehicle) {
                return Ok(cur);
            }
            let mut rec = cur.clone();
            rec.vehicle = Some(vehicle.to_string());
            rec.rev += 1;
            rec.updated_ms = now_ms;
            rec.state = facts::replay(&facts, &rec.spec);
            if self.swap(&rec, cur.rev, &[]).await? {
                self.redispatch(
                    &rec,
                    cur.vehicle.as_deref(),
                    Source::Operator {
                        credential: credential.into(),
                    },
                    now_ms,
                )
                .await?;
                return Ok(self
                    .store
                    .shipment(id)
                    .await?
                    .map(|(r, _)| r)
                    .unwrap_or(rec));
            }
        }
        Err(busy("vehicle"))
    }

    /// Dispatches the shipment's vehicle and, if it moved, the one it left.
    async fn redispatch(
        &self,
        rec: &ShipmentRecord,
        old_vehicle: Option<&str>,
        source: Source,
        now_ms: u64,
    ) -> Result<(), ShipmentError> {
        if let Some(old) = old_vehicle
            && rec.vehicle.as_deref() != Some(old)
        {
            self.dispatch_vehicle(old, &source, now_ms).await?;
        }
        if let Some(v) = &rec.vehicle {
            self.dispatch_vehicle(v, &source, now_ms).await?;
        }
        Ok(())
    }

    /// Makes `vehicle`'s assignment its open shipments' stops (a new version only if they
    /// changed) and records DISPATCHED for each shipment newly on it.
    pub async fn dispatch_vehicle(
        &self,
        vehicle: &str,
        source: &Source,
        now_ms: u64,
    ) -> Result<(), ShipmentError> {
        for _ in 0..CAS_ATTEMPTS {
            let open = self.store.vehicle_shipments(vehicle).await?;
            let current = self.store.assignment(vehicle).await?;
            let next_version = current.as_ref().map_or(1, |c| c.assignment.version + 1);
            let built = build_assignment(&open, next_version)
                .map_err(|e| ShipmentError::Conflict(field("stops", e)))?;
            let same = current
                .as_ref()
                .is_some_and(|c| c.assignment.id == built.id && c.assignment.stops == built.stops)
                || (current.is_none() && built.stops.is_empty());
            if !same {
                match self.dispatch.assign(vehicle, &built, now_ms).await {
                    Ok(()) => {}
                    Err(AssignError::Stale { .. }) => continue,
                    Err(AssignError::Invalid(m)) => {
                        return Err(ShipmentError::Conflict(field("stops", m)));
                    }
                    Err(AssignError::Store(e)) => return Err(e.into()),
                }
                tracing::info!(%vehicle, version = built.version, stops = built.stops.len(), "assignment rebuilt from shipments");
            }
            for (rec, facts) in &open {
                let fid = format!("dispatched:{vehicle}");
                if facts.iter().any(|f| f.id == fid) {
                    continue;
                }
                let fact = Fact {
                    id: fid,
                    kind: FactType::Dispatched,
                    classifier: Classifier::Actual,
                    stop_id: None,
                    event_time: Time(now_ms),
                    recorded_time: Time(now_ms),
                    source: source.clone(),
                    retracts: None,
                    note: Some(format!("on {vehicle}'s assignment")),
                };
                self.add_fact(&rec.id, fact, |_| Ok(()), now_ms).await?;
            }
            return Ok(());
        }
        Err(ShipmentError::Conflict(field(
            "vehicle",
            "the vehicle's assignment is being changed by other calls at the same time; try again",
        )))
    }

    /// Judges every DELIVERED shipment's POD that is not confirmed or in review yet
    /// ([`judge_pod`]): POD_CONFIRMED when its evidence is all at the hub and every rule
    /// holds, a review item when a rule fails, nothing while photos are still on their
    /// way. Idempotent (facts and items keyed by the POD event), so every hub process
    /// may run it.
    pub async fn confirm_pods(&self, now_ms: u64) -> Result<u64, ShipmentError> {
        let mut confirmed = 0;
        let mut after = None;
        loop {
            let page = self
                .store
                .shipments(&ShipmentQuery {
                    state: Some(State::Delivered),
                    after: after.clone(),
                    limit: 200,
                    ..Default::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.updated_ms, last.id.clone()));
            for rec in &page {
                confirmed += self.confirm_one(&rec.id, now_ms).await?;
            }
            if page.len() < 200 {
                break;
            }
        }
        Ok(confirmed)
    }

    async fn confirm_one(&self, id: &str, now_ms: u64) -> Result<u64, ShipmentError> {
        let Some((rec, facts)) = self.store.shipment(id).await? else {
            return Ok(0);
        };
        let retracted: std::collections::HashSet<&str> =
            facts.iter().filter_map(|f| f.retracts.as_deref()).collect();
        let mut n = 0;
        for f in facts.iter().filter(|f| {
            f.kind == FactType::Delivered
                && f.classifier == Classifier::Actual
                && !retracted.contains(f.id.as_str())
        }) {
            let Source::Device { device, epoch, seq } = &f.source else {
                continue;
            };
            let confirmed_id = format!("{}:confirmed", f.id);
            if facts.iter().any(|x| x.id == confirmed_id)
                || self.store.review(&f.id).await?.is_some()
            {
                continue;
            }
            let after = seq.checked_sub(1).map(|s| (*epoch, s));
            let rows = self.store.events(device, after, 1, Some("pod")).await?;
            let Some((e, s, stored)) = rows.into_iter().next() else {
                continue;
            };
            let fleetsync_protocol::Body::Pod(pod) = &stored.event.body else {
                continue;
            };
            if (e, s) != (*epoch, *seq) {
                continue;
            }
            let mut have = std::collections::HashMap::new();
            for b in pod.signature.iter().chain(pod.photos.iter()) {
                have.insert(b.sha256, self.store.blob_exists(&b.sha256).await?);
            }
            match judge_pod(
                &rec,
                &facts,
                pod,
                stored.event.time_ms,
                Some(&f.source),
                &|sha| have.get(sha).copied().unwrap_or(false),
            ) {
                PodVerdict::Waiting => {}
                PodVerdict::Confirmed => {
                    let fact = Fact {
                        id: confirmed_id,
                        kind: FactType::PodConfirmed,
                        classifier: Classifier::Actual,
                        stop_id: f.stop_id.clone(),
                        event_time: f.event_time,
                        recorded_time: Time(now_ms),
                        source: f.source.clone(),
                        retracts: None,
                        note: Some(
                            "evidence meets the POD policy, inside the fence, after arrival".into(),
                        ),
                    };
                    self.add_fact(id, fact, |_| Ok(()), now_ms).await?;
                    tracing::info!(shipment = %id, "POD confirmed: billing released");
                    n += 1;
                }
                PodVerdict::Review(kind, detail) => {
                    let item = ReviewItem {
                        id: f.id.clone(),
                        kind,
                        shipment_id: Some(id.to_string()),
                        stop_id: f.stop_id.clone(),
                        source: f.source.clone(),
                        event_time: f.event_time,
                        created_time: Time(now_ms),
                        status: ReviewStatus::Open,
                        decided_by: None,
                        note: None,
                        decided_time: None,
                        detail,
                    };
                    if self.store.put_review(&item, None).await? {
                        tracing::warn!(shipment = %id, rule = kind.rule(), "POD waits for review");
                    }
                }
            }
        }
        Ok(n)
    }

    /// `POST /v1/ops/review/{id}/accept|reject`: records the decision and the fact it
    /// implies, under the operator's credential name.
    pub async fn decide_review(
        &self,
        id: &str,
        accept: bool,
        note: String,
        who: &str,
        now_ms: u64,
    ) -> Result<ReviewItem, ShipmentError> {
        let Some(item) = self.store.review(id).await? else {
            return Err(ShipmentError::NotFound);
        };
        if item.status != ReviewStatus::Open {
            return Err(ShipmentError::Conflict(field(
                "id",
                format!(
                    "already {} by {}",
                    item.status.as_str(),
                    item.decided_by.as_deref().unwrap_or("?")
                ),
            )));
        }
        let source = Source::Operator {
            credential: who.to_string(),
        };
        let pod_rule = matches!(
            item.kind,
            ReviewKind::PodOutsideFence
                | ReviewKind::PodMissingEvidence
                | ReviewKind::PodBeforeArrival
        );
        if let Some(sid) = &item.shipment_id {
            let fact = match (pod_rule, accept) {
                (true, true) => Some(Fact {
                    id: format!("{}:accepted", item.id),
                    kind: FactType::PodConfirmed,
                    classifier: Classifier::Actual,
                    stop_id: item.stop_id.clone(),
                    event_time: item.event_time,
                    recorded_time: Time(now_ms),
                    source: source.clone(),
                    retracts: None,
                    note: Some(note.clone()),
                }),
                (true, false) => Some(Fact {
                    id: format!("{}:rejected", item.id),
                    kind: FactType::Retracted,
                    classifier: Classifier::Actual,
                    stop_id: item.stop_id.clone(),
                    event_time: item.event_time,
                    recorded_time: Time(now_ms),
                    source: source.clone(),
                    retracts: Some(item.id.clone()),
                    note: Some(note.clone()),
                }),
                (false, true) => {
                    // A POD from another vehicle or for a shipment then unknown, or an
                    // arrival at another vehicle's stop: the operator says it counts for
                    // the named shipment.
                    if self.store.shipment(sid).await?.is_none() {
                        return Err(ShipmentError::Conflict(field(
                            "id",
                            format!(
                                "shipment {sid:?} does not exist; the ERP must release it before this POD can count"
                            ),
                        )));
                    }
                    Some(Fact {
                        id: format!("{}:accepted", item.id),
                        kind: if item.kind == ReviewKind::ArrivalNotAssigned {
                            FactType::Arrived
                        } else {
                            FactType::Delivered
                        },
                        classifier: Classifier::Actual,
                        stop_id: item.stop_id.clone(),
                        event_time: item.event_time,
                        recorded_time: Time(now_ms),
                        source: source.clone(),
                        retracts: None,
                        note: Some(note.clone()),
                    })
                }
                (false, false) => None,
            };
            if let Some(fact) = fact {
                self.add_fact(sid, fact, |_| Ok(()), now_ms).await?;
            }
        }
        let mut decided = item.clone();
        decided.status = if accept {
            ReviewStatus::Accepted
        } else {
            ReviewStatus::Rejected
        };
        decided.decided_by = Some(who.to_string());
        decided.note = Some(note);
        decided.decided_time = Some(Time(now_ms));
        if !self
            .store
            .put_review(&decided, Some(ReviewStatus::Open))
            .await?
        {
            return Err(ShipmentError::Conflict(field(
                "id",
                "decided by someone else just now",
            )));
        }
        Ok(decided)
    }

    /// Shipments waiting longer than `age_ms` where they should not wait: released but
    /// not dispatched (CREATED), dispatched but the vehicle has not acknowledged its
    /// assignment (PLANNED), delivered without a confirmed POD (DELIVERED), and waiting
    /// in the review queue.
    pub async fn stuck(&self, now_ms: u64, age_ms: u64) -> Result<Vec<Stuck>, ShipmentError> {
        let cutoff = now_ms.saturating_sub(age_ms);
        let mut out = Vec::new();
        for state in [State::Created, State::Planned, State::Delivered] {
            let mut after = None;
            loop {
                let page = self
                    .store
                    .shipments(&ShipmentQuery {
                        state: Some(state),
                        after: after.clone(),
                        limit: 500,
                        ..Default::default()
                    })
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some((last.updated_ms, last.id.clone()));
                for r in &page {
                    let since = match state {
                        State::Created => Some((StuckReason::ReleasedNotDispatched, r.created_ms)),
                        State::Planned => match &r.vehicle {
                            Some(v) => match self.store.assignment(v).await? {
                                Some(a) if !a.acknowledged() => {
                                    Some((StuckReason::DispatchedNotAcknowledged, a.sent_ms))
                                }
                                _ => None,
                            },
                            None => None,
                        },
                        _ => Some((StuckReason::DeliveredWithoutPod, r.updated_ms)),
                    };
                    if let Some((reason, since)) = since
                        && since <= cutoff
                    {
                        out.push(Stuck {
                            reason,
                            shipment_id: r.id.clone(),
                            vehicle: r.vehicle.clone(),
                            state: r.state,
                            since: Time(since),
                        });
                    }
                }
                if page.len() < 500 {
                    break;
                }
            }
        }
        for item in self.store.reviews(Some(ReviewStatus::Open), 10_000).await? {
            if item.created_time.0 <= cutoff
                && let Some(sid) = &item.shipment_id
            {
                let state = self
                    .store
                    .shipment(sid)
                    .await?
                    .map_or(State::Created, |(r, _)| r.state);
                out.push(Stuck {
                    reason: StuckReason::WaitingInReview,
                    shipment_id: sid.clone(),
                    vehicle: None,
                    state,
                    since: item.created_time,
                });
            }
        }
        Ok(out)
    }

    /// Estimates the arrival at every open stop of every vehicle with a position from
    /// the last 10 minutes ([`eta`]): a shipment is written only when its estimates
    /// change, with an EST fact for each that moved by more than 5 minutes; the round's
    /// writes go to the store together (one durable write on sled), each its own
    /// compare-and-swap, and one that lost a race is estimated again on a fresh read.
    /// Idempotent per position (fact ids name the fix), so every hub process may run it.
    pub async fn estimate(
        &self,
        settings: &EtaSettings,
        now_ms: u64,
    ) -> Result<EtaReport, ShipmentError> {
        let mut report = EtaReport::default();
        let vehicles = self.store.shipment_vehicles().await?;
        let mut writes = Vec::new();
        let mut redo = Vec::new();
        let fresh: BTreeMap<String, VehiclePosition> = self
            .store
            .positions(&vehicles)
            .await?
            .into_iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.time_ms) <= eta::STALE_AFTER_MS)
            .collect();
        let ids: Vec<String> = fresh.keys().cloned().collect();
        let mut open_of = self.store.vehicles_shipments(&ids).await?;
        for (vehicle, pos) in fresh {
            let Some(open) = open_of.remove(&vehicle) else {
                continue;
            };
            report.vehicles += 1;
            let etas = plan_etas(&open, &pos, settings);
            for (rec, _) in &open {
                if let Some(w) = estimated(rec, &vehicle, &pos, &etas, now_ms) {
                    redo.push((rec.id.clone(), vehicle.clone(), pos.clone(), etas.clone()));
                    writes.push(w);
                }
            }
        }
        let facts: Vec<u64> = writes.iter().map(|w| w.facts.len() as u64).collect();
        let written = self.store.put_shipments(writes).await?;
        for (i, ok) in written.into_iter().enumerate() {
            if ok {
                report.written += 1;
                report.facts += facts[i];
                continue;
            }
            let (id, vehicle, pos, etas) = &redo[i];
            for _ in 0..CAS_ATTEMPTS {
                let Some((cur, _)) = self.store.shipment(id).await? else {
                    break;
                };
                let Some(w) = estimated(&cur, vehicle, pos, etas, now_ms) else {
                    break;
                };
                let n = w.facts.len() as u64;
                if self.store.put_shipments(vec![w]).await? == [true] {
                    report.written += 1;
                    report.facts += n;
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Brings every vehicle's assignment in line with its shipments (at start: repairs
    /// a crash between a shipment write and its dispatch).
    pub async fn reconcile(&self, now_ms: u64) -> Result<(), ShipmentError> {
        for v in self.store.shipment_vehicles().await? {
            let source = Source::Operator {
                credential: "hub start".into(),
            };
            self.dispatch_vehicle(&v, &source, now_ms).await?;
        }
        Ok(())
    }
}

/// What one round of estimates did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EtaReport {
    /// Vehicles estimated (open shipments and a fresh position).
    pub vehicles: u64,
    /// Shipments written.
    pub written: u64,
    /// EST facts made.
    pub facts: u64,
}

/// `cur` with the vehicle's new estimates folded in, and the EST facts that makes;
/// `None` if nothing changes (or the shipment is no longer this vehicle's open one).
fn estimated(
    cur: &ShipmentRecord,
    vehicle: &str,
    pos: &VehiclePosition,
    etas: &BTreeMap<String, u64>,
    now_ms: u64,
) -> Option<ShipmentWrite> {
    if cur.vehicle.as_deref() != Some(vehicle) || cur.state.is_finished() {
        return None;
    }
    let from = source_id(vehicle, pos.epoch, pos.seq);
    let mut rec = cur.clone();
    let mut facts = Vec::new();
    // Stops reached (or gone from the shipment) lose their estimate.
    rec.estimates.retain(|stop, _| etas.contains_key(stop));
    for stop in &cur.spec.stops {
        let Some(&at) = etas.get(&stop.id) else {
            continue;
        };
        let end = stop.window.map(|w| w.end.0);
        let next = eta::next_estimate(cur.estimates.get(&stop.id), at, end, &from);
        if next.publish {
            facts.push(Fact {
                id: format!("eta:{}:{from}", stop.id),
                kind: FactType::Eta,
                classifier: Classifier::Estimated,
                stop_id: Some(stop.id.clone()),
                event_time: Time(at),
                recorded_time: Time(now_ms),
                source: Source::Device {
                    device: vehicle.to_string(),
                    epoch: pos.epoch,
                    seq: pos.seq,
                },
                retracts: None,
                note: Some(format!(
                    "estimated from the position at {}",
                    Time(pos.time_ms).to_rfc3339()
                )),
            });
        }
        rec.estimates.insert(stop.id.clone(), next.estimate);
    }
    if rec.estimates == cur.estimates {
        return None;
    }
    rec.rev += 1;
    rec.updated_ms = now_ms;
    Some(ShipmentWrite {
        rec,
        expected_rev: cur.rev,
        facts,
    })
}

/// Arrival estimates of a vehicle's stops not yet reached, in its assignment's order.
fn plan_etas(
    open: &[(ShipmentRecord, Vec<Fact>)],
    pos: &VehiclePosition,
    settings: &EtaSettings,
) -> BTreeMap<String, u64> {
    let Ok(plan) = build_assignment(open, 0) else {
        return BTreeMap::new();
    };
    let arrived: BTreeSet<&str> = open
        .iter()
        .flat_map(|(_, facts)| facts)
        .filter(|f| f.classifier == Classifier::Actual && f.kind == FactType::Arrived)
        .filter_map(|f| f.stop_id.as_deref())
        .collect();
    let stops: Vec<(&str, &fleetsync_protocol::Fence)> = plan
        .stops
        .iter()
        .filter(|s| !arrived.contains(s.id.as_str()))
        .map(|s| (s.id.as_str(), &s.fence))
        .collect();
    let etas = eta::estimate(pos, &stops, settings);
    stops
        .iter()
        .zip(etas)
        .map(|((id, _), t)| ((*id).to_string(), t))
        .collect()
}

/// Why a shipment is stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StuckReason {
    /// Released by the ERP, on no vehicle.
    ReleasedNotDispatched,
    /// On a vehicle's assignment that the vehicle has not acknowledged.
    DispatchedNotAcknowledged,
    /// Delivered, the POD not confirmed.
    DeliveredWithoutPod,
    /// A review item waits for an operator.
    WaitingInReview,
}

/// Every reason, in the metric's order.
pub const STUCK_REASONS: [StuckReason; 4] = [
    StuckReason::ReleasedNotDispatched,
    StuckReason::DispatchedNotAcknowledged,
    StuckReason::DeliveredWithoutPod,
    StuckReason::WaitingInReview,
];

impl StuckReason {
    /// The reason's name (JSON and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            StuckReason::ReleasedNotDispatched => "released_not_dispatched",
            StuckReason::DispatchedNotAcknowledged => "dispatched_not_acknowledged",
            StuckReason::DeliveredWithoutPod => "delivered_without_pod",
            StuckReason::WaitingInReview => "waiting_in_review",
        }
    }
}

/// A stuck shipment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stuck {
    /// Why.
    pub reason: StuckReason,
    /// The shipment.
    pub shipment_id: String,
    /// Its vehicle.
    pub vehicle: Option<String>,
    /// Its state.
    pub state: State,
    /// Waiting since.
    pub since: Time,
}

fn erp_fact(
    kind: &str,
    t: FactType,
    cur: &ShipmentRecord,
    credential: &str,
    now_ms: u64,
    note: Option<String>,
) -> Fact {
    Fact {
        id: kind.to_string(),
        kind: t,
        classifier: Classifier::Actual,
        stop_id: None,
        event_time: Time(now_ms),
        recorded_time: Time(now_ms),
        source: Source::Erp {
            credential: credential.to_string(),
            version: cur.version,
        },
        retracts: None,
        note,
    }
}
