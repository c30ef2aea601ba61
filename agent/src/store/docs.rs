//! Beside the event lanes: POD blobs, the current assignment, POD idempotency answers and
//! the PODs taken per stop.
//!
//! A POD is stored in ONE sled transaction: its blobs, its event (critical lane), its
//! idempotency answer and its stop record, after making room by thinning telemetry like
//! any append (blobs count in the quota). So a POD is either wholly stored or not at all,
//! and `append_pod` returns only once that transaction is durable.

use fleetsync_protocol::{Assignment, Body, Event, Sha256};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::{KEY_LEN, Store, StoreError, map_tx};

const ASSIGNMENT: &[u8] = b"assignment";
const IDEM: &[u8] = b"idem/";
const STOP: &[u8] = b"stop/";

/// What a stored POD answered (replayed for a repeated `Idempotency-Key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStored {
    /// POD id.
    pub pod_id: String,
    /// Event identity.
    pub epoch: u32,
    /// Event identity.
    pub seq: u64,
    /// The request's fingerprint, so a different body under the same key is refused.
    pub fingerprint: [u8; 32],
}

/// A POD taken at a stop of the current assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopPod {
    /// POD id.
    pub pod_id: String,
    /// `delivered`, `refused`, `damaged`, `partial`.
    pub outcome: String,
    /// Capture time.
    pub time_ms: u64,
}

fn doc_key(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// What goes into the same transaction as a critical event, beside it.
#[derive(Default)]
struct Beside {
    /// New blobs (sha256, bytes); they count in the quota.
    blobs: Vec<(Sha256, Vec<u8>)>,
    /// Documents written.
    put: Vec<(Vec<u8>, Vec<u8>)>,
    /// Documents removed.
    remove: Vec<sled::IVec>,
}

impl Store {
    /// Appends the critical event `value` and, in ONE sled transaction with it, the blobs
    /// `blobs` (those not stored yet) and the documents `docs` builds from the event's seq,
    /// after making room by thinning telemetry like any append. Returns the seq once the
    /// transaction is durable. `docs` runs under the state lock, before any seq is taken,
    /// so what it reads holds until the transaction and its error leaves no trace.
    async fn append_critical_with(
        &self,
        value: Vec<u8>,
        blobs: Vec<(Sha256, Vec<u8>)>,
        docs: impl FnOnce(&Self, u64) -> Result<Beside, StoreError>,
    ) -> Result<u64, StoreError> {
        let core = &self.inner.core;
        let (seq, ticket) = {
            let mut st = core.state()?;
            // Blob writers hold the state lock, so this stays true until the transaction.
            let mut fresh = Vec::with_capacity(blobs.len());
            for b in blobs {
                if !core.blobs.contains_key(b.0)? {
                    fresh.push(b);
                }
            }
            let n = (KEY_LEN + value.len()) as u64
                + fresh
                    .iter()
                    .map(|(_, b)| (32 + b.len()) as u64)
                    .sum::<u64>();
            let plan = core.plan_room(&st, n)?;
            // Nothing may fail between taking seqs and the transaction (a seq taken and not
            // written would be a hole), so the documents are built first, for the seq the
            // event will get after any gap records.
            let gaps = plan.as_ref().map_or(0, |p| p.gaps.len() as u64);
            let mut beside = docs(self, st.next_seq + gaps)?;
            beside.blobs = fresh;
            let gap_kvs: Vec<(Vec<u8>, Vec<u8>)> = match &plan {
                Some(p) => {
                    let mut v = Vec::with_capacity(p.gaps.len());
                    for g in &p.gaps {
                        v.push((core.key(st.alloc_seq()?).to_vec(), g.clone()));
                    }
                    v
                }
                None => Vec::new(),
            };
            let seq = st.alloc_seq()?;
            let key = core.key(seq);
            let victims: &[sled::IVec] = plan.as_ref().map_or(&[], |p| &p.victims);
            (&core.critical, &core.telemetry, &core.blobs, &core.docs)
                .transaction(|(crit, tele, blob_t, docs_t)| {
                    for (k, v) in &gap_kvs {
                        crit.insert(k.as_slice(), v.as_slice())?;
                    }
                    for k in victims {
                        tele.remove(k)?;
                    }
                    for (sha, b) in &beside.blobs {
                        blob_t.insert(sha.as_slice(), b.as_slice())?;
                    }
                    crit.insert(&key, value.as_slice())?;
                    for k in &beside.remove {
                        docs_t.remove(k)?;
                    }
                    for (k, v) in &beside.put {
                        docs_t.insert(k.as_slice(), v.as_slice())?;
                    }
                    Ok::<(), ConflictableTransactionError<StoreError>>(())
                })
                .map_err(map_tx)?;
            if let Some(p) = &plan {
                let evicted = p.victims.len() as u64;
                st.telemetry.events -= evicted;
                st.telemetry.bytes -= p.freed;
                st.critical.events += gap_kvs.len() as u64;
                st.critical.bytes += p.gap_bytes;
                st.evicted += evicted;
                st.gaps_declared += gap_kvs.len() as u64;
            }
            st.critical.events += 1;
            st.critical.bytes += (KEY_LEN + value.len()) as u64;
            for (_, b) in &beside.blobs {
                st.blobs.events += 1;
                st.blobs.bytes += (32 + b.len()) as u64;
            }
            (seq, core.commits.register())
        };
        core.commits.wait(ticket).await?;
        Ok(seq)
    }

    /// Stores a POD event with its blobs, idempotency answer and stop record atomically;
    /// returns once durable.
    pub async fn append_pod(
        &self,
        ev: Event,
        blobs: Vec<(Sha256, Vec<u8>)>,
        idempotency_key: Option<&str>,
        fingerprint: [u8; 32],
        stop: StopPod,
    ) -> Result<PodStored, StoreError> {
        let Body::Pod(pod) = &ev.body else {
            return Err(StoreError::Corrupt("append_pod needs a POD event".into()));
        };
        let stop_id = pod.stop_id.to_string();
        let pod_id = pod.pod_id.to_string();
        // The same picture twice (or one still pending from an earlier POD) is one blob.
        let mut blobs = blobs;
        blobs.sort_by_key(|b| b.0);
        blobs.dedup_by(|a, b| a.0 == b.0);
        let value = postcard::to_stdvec(&ev)?;
        let epoch = self.inner.core.epoch;
        let stop_bytes = postcard::to_stdvec(&stop)?;
        let seq = self
            .append_critical_with(value, blobs, |_, seq| {
                let stored = PodStored {
                    pod_id: pod_id.clone(),
                    epoch,
                    seq,
                    fingerprint,
                };
                let mut put = vec![(doc_key(STOP, &stop_id), stop_bytes)];
                if let Some(k) = idempotency_key {
                    put.push((doc_key(IDEM, k), postcard::to_stdvec(&stored)?));
                }
                Ok(Beside {
                    put,
                    ..Beside::default()
                })
            })
            .await?;
        Ok(PodStored {
            pod_id,
            epoch,
            seq,
            fingerprint,
        })
    }

    /// The answer stored for a POD `Idempotency-Key`.
    pub fn pod_by_key(&self, key: &str) -> Result<Option<PodStored>, StoreError> {
        match self.inner.core.docs.get(doc_key(IDEM, key))? {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    /// The POD taken at `stop_id`, if any.
    pub fn stop_pod(&self, stop_id: &str) -> Result<Option<StopPod>, StoreError> {
        match self.inner.core.docs.get(doc_key(STOP, stop_id))? {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    /// Blobs awaiting the hub's `BlobAck`, with their sizes.
    pub fn pending_blobs(&self) -> Result<Vec<(Sha256, usize)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.core.blobs.iter() {
            let (k, v) = item?;
            let sha: Sha256 = k
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("blob key not 32 bytes".into()))?;
            out.push((sha, v.len()));
        }
        Ok(out)
    }

    /// A pending blob's bytes.
    pub fn blob(&self, sha: &Sha256) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.core.blobs.get(sha)?.map(|v| v.to_vec()))
    }

    /// Deletes a blob the hub has stored (durable at the next commit round).
    pub fn remove_blob(&self, sha: &Sha256) -> Result<bool, StoreError> {
        let core = &self.inner.core;
        let mut st = core.state()?;
        match core.blobs.remove(sha)? {
            Some(v) => {
                st.blobs.events -= 1;
                st.blobs.bytes -= (32 + v.len()) as u64;
                core.commits.register();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The assignment in force.
    pub fn assignment(&self) -> Result<Option<Assignment>, StoreError> {
        match self.inner.core.docs.get(ASSIGNMENT)? {
            Some(v) => Ok(Some(postcard::from_bytes(&v)?)),
            None => Ok(None),
        }
    }

    /// Stores `a` if its version is higher than the one in force (versions count up per
    /// device across jobs; the hub enforces it), together with `ack` (its `AssignmentAck`
    /// event) in one transaction, so an assignment in force always has its ack on the way
    /// to the hub; returns once durable whether it was stored. A late, older or repeated
    /// assignment is ignored. A new job clears the old one's stop records.
    pub async fn put_assignment(&self, a: &Assignment, ack: Event) -> Result<bool, StoreError> {
        if !matches!(ack.body, Body::AssignmentAck(_)) {
            return Err(StoreError::Corrupt(
                "put_assignment needs an AssignmentAck event".into(),
            ));
        }
        let value = postcard::to_stdvec(&ack)?;
        let doc = postcard::to_stdvec(a)?;
        let r = self
            .append_critical_with(value, Vec::new(), |store, _| {
                let cur = store.assignment()?;
                if cur.as_ref().is_some_and(|cur| cur.version >= a.version) {
                    return Err(StoreError::NotNewer);
                }
                let mut remove = Vec::new();
                if cur.is_none_or(|cur| cur.id != a.id) {
                    remove = store
                        .inner
                        .core
                        .docs
                        .scan_prefix(STOP)
                        .keys()
                        .collect::<Result<_, _>>()?;
                }
                Ok(Beside {
                    put: vec![(ASSIGNMENT.to_vec(), doc)],
                    remove,
                    ..Beside::default()
                })
            })
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(StoreError::NotNewer) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
