//! Beside the event lanes: POD blobs, the current assignment, POD idempotency answers and
//! the PODs taken per stop.
//!
//! A POD is stored in ONE sled transaction: its blobs' records, its event (critical lane),
//! its idempotency answer and its stop record, after making room by thinning telemetry
//! like any append (blobs count in the quota) and after its blob files are renamed to
//! their digests and their folder fsynced ([`super::blobs`]). So a POD is either wholly
//! stored or not at all, and `append_pod` returns only once that transaction is durable.

use std::path::PathBuf;

use fleetsync_protocol::{Assignment, Body, Event, Sha256};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::ConflictableTransactionError;

use super::blobs::{self, BlobFile};
use super::{COUNTS_KEY, KEY_LEN, State, Store, StoreError, commit, encode_counts, map_tx};

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
    /// Documents written.
    put: Vec<(Vec<u8>, Vec<u8>)>,
    /// Documents removed.
    remove: Vec<sled::IVec>,
}

impl Store {
    /// Appends the critical event `value` and, in ONE sled transaction with it, the records
    /// of `files` (those not pending already; their files renamed to their digests and the
    /// folder fsynced first) and the documents `docs` builds from the event's seq, after
    /// making room by thinning telemetry like any append. Returns the seq once the
    /// transaction is durable. `docs` runs under the state lock, before any seq is taken,
    /// so what it reads holds until the transaction and its error leaves no trace.
    ///
    /// The commit (renames and fsyncs under the state lock) runs on a blocking thread, not
    /// on a runtime worker; only the wait for its group commit is async.
    async fn append_critical_with(
        &self,
        value: Vec<u8>,
        files: Vec<BlobFile>,
        docs: impl FnOnce(&Self, u64) -> Result<Beside, StoreError> + Send + 'static,
    ) -> Result<u64, StoreError> {
        let store = self.clone();
        let (seq, ticket) = tokio::task::spawn_blocking(move || {
            let mut files = files;
            let res = store.commit_locked(&value, &mut files, docs);
            // Only once the lock is released: an upload's drop takes it to give its
            // reservation back.
            drop(files);
            res
        })
        .await
        .map_err(|e| StoreError::Commit(format!("commit task: {e}")))??;
        self.inner.core.commits.wait(ticket).await?;
        Ok(seq)
    }

    /// The part of [`Self::append_critical_with`] under the state lock; returns the seq and
    /// the commit ticket. On an error, files it renamed to their digests are deleted
    /// before the lock is released: a POD committing the same digest next renames its own
    /// file there and records it, and must not find it deleted after.
    fn commit_locked(
        &self,
        value: &[u8],
        files: &mut [BlobFile],
        docs: impl FnOnce(&Self, u64) -> Result<Beside, StoreError>,
    ) -> Result<(u64, u64), StoreError> {
        let mut st = self.inner.core.state()?;
        let mut renamed: Vec<PathBuf> = Vec::new();
        let res = self.commit_under(&mut st, value, files, &mut renamed, docs);
        if res.is_err() {
            // Renamed but not recorded: not a pending blob. (Open deletes any left over.)
            for p in renamed {
                let _ = std::fs::remove_file(p);
            }
        }
        res
    }

    /// [`Self::commit_locked`] with the state lock held (`st`); every file it renames is
    /// pushed to `renamed` until the transaction has recorded it.
    fn commit_under(
        &self,
        st: &mut State,
        value: &[u8],
        files: &mut [BlobFile],
        renamed: &mut Vec<PathBuf>,
        docs: impl FnOnce(&Self, u64) -> Result<Beside, StoreError>,
    ) -> Result<(u64, u64), StoreError> {
        let core = &self.inner.core;
        let dir = core.path.join(blobs::DIR);
        // Blob writers hold the state lock, so this stays true until the transaction.
        let mut fresh = Vec::with_capacity(files.len());
        let mut reserved = 0u64;
        for (i, f) in files.iter().enumerate() {
            reserved += f.reserved;
            if !core.blob_records.contains_key(f.sha256)? {
                fresh.push(i);
            }
        }
        let n = (KEY_LEN + value.len()) as u64;
        let file_bytes = fresh
            .iter()
            .map(|&i| blobs::counted(files[i].len))
            .sum::<u64>();
        // The uploads' reserved bytes become the blobs': plan without them.
        st.inflight -= reserved;
        let plan = core.plan_room(st, n, file_bytes);
        st.inflight += reserved;
        let plan = plan?;
        // Nothing may fail between taking seqs and the transaction (a seq taken and not
        // written would be a hole), so the documents are built and the files renamed first,
        // for the seq the event will get after any gap records.
        let gaps = plan.as_ref().map_or(0, |p| p.gaps.len() as u64);
        let beside = docs(self, st.next_seq + gaps)?;
        for &i in &fresh {
            let f = &files[i];
            let fin = blobs::file_path(&dir, &f.sha256);
            if let Some(tmp) = &f.tmp {
                std::fs::rename(tmp, &fin).map_err(|source| StoreError::Io {
                    path: fin.clone(),
                    source,
                })?;
                renamed.push(fin);
            }
        }
        if !fresh.is_empty() {
            commit::sync_path(&dir)?;
        }
        let records: Vec<(Sha256, [u8; 8])> = fresh
            .iter()
            .map(|&i| (files[i].sha256, files[i].len.to_be_bytes()))
            .collect();
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
        let (mut crit_after, tele_after) = match &plan {
            Some(p) => super::thinned(
                st,
                p.victims.len() as u64,
                p.freed,
                gap_kvs.len(),
                p.gap_bytes,
            ),
            None => (st.critical, st.telemetry),
        };
        crit_after.events += 1;
        crit_after.bytes += (KEY_LEN + value.len()) as u64;
        (
            &core.critical,
            &core.telemetry,
            &core.blob_records,
            &core.docs,
        )
            .transaction(|(crit, tele, blob_t, docs_t)| {
                for (k, v) in &gap_kvs {
                    crit.insert(k.as_slice(), v.as_slice())?;
                }
                for k in victims {
                    tele.remove(k)?;
                }
                for (sha, len) in &records {
                    blob_t.insert(sha.as_slice(), len.as_slice())?;
                }
                crit.insert(&key, value)?;
                crit.insert(&COUNTS_KEY[..], &encode_counts(crit_after, &key)[..])?;
                if !victims.is_empty() {
                    tele.insert(
                        &COUNTS_KEY[..],
                        &encode_counts(tele_after, &st.through[1])[..],
                    )?;
                }
                for k in &beside.remove {
                    docs_t.remove(k)?;
                }
                for (k, v) in &beside.put {
                    docs_t.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<StoreError>>(())
            })
            .map_err(map_tx)?;
        renamed.clear();
        if let Some(p) = &plan {
            st.evicted += p.victims.len() as u64;
            st.gaps_declared += gap_kvs.len() as u64;
        }
        st.critical = crit_after;
        st.telemetry = tele_after;
        st.through[0] = key;
        // Every upload's reservation ends here: a fresh one's bytes are the blob's now, a
        // repeated one's file is deleted when `files` is dropped.
        st.inflight -= reserved;
        for f in files.iter_mut() {
            f.reserved = 0;
        }
        for &i in &fresh {
            files[i].tmp = None;
            st.blobs.events += 1;
            st.blobs.bytes += blobs::counted(files[i].len);
        }
        Ok((seq, core.commits.register()))
    }

    /// Stores a POD event with its blobs (finished uploads), idempotency answer and stop
    /// record atomically; returns once durable.
    pub async fn append_pod(
        &self,
        ev: Event,
        files: Vec<BlobFile>,
        idempotency_key: Option<&str>,
        fingerprint: [u8; 32],
        stop: StopPod,
    ) -> Result<PodStored, StoreError> {
        let Body::Pod(pod) = &ev.body else {
            return Err(StoreError::Corrupt("append_pod needs a POD event".into()));
        };
        let stop_id = pod.stop_id.to_string();
        let pod_id = pod.pod_id.to_string();
        // The same picture twice (or one still pending from an earlier POD) is one blob;
        // the duplicate upload is dropped (its file deleted, its reservation given back).
        let mut files = files;
        files.sort_by_key(|f| f.sha256);
        files.dedup_by(|a, b| a.sha256 == b.sha256);
        let value = postcard::to_stdvec(&ev)?;
        let epoch = self.inner.core.epoch;
        let stop_bytes = postcard::to_stdvec(&stop)?;
        let idempotency_key = idempotency_key.map(str::to_owned);
        let closure_pod_id = pod_id.clone();
        let seq = self
            .append_critical_with(value, files, move |_, seq| {
                let stored = PodStored {
                    pod_id: closure_pod_id,
                    epoch,
                    seq,
                    fingerprint,
                };
                let mut put = vec![(doc_key(STOP, &stop_id), stop_bytes)];
                if let Some(k) = &idempotency_key {
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
        let (version, id) = (a.version, a.id.clone());
        let r = self
            .append_critical_with(value, Vec::new(), move |store, _| {
                let cur = store.assignment()?;
                if cur.as_ref().is_some_and(|cur| cur.version >= version) {
                    return Err(StoreError::NotNewer);
                }
                let mut remove = Vec::new();
                if cur.is_none_or(|cur| cur.id != id) {
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
