//! Group commit: one background thread makes the store durable for every write registered
//! since its previous round, then wakes the waiters.
//!
//! Invariants:
//! - A writer registers its ticket *after* its sled write has completed, so when the thread
//!   reads `written = W` every write with a ticket `<= W` is already in sled and the
//!   following `flush` + fsync covers it.
//! - `Status::durable` and `Status::failed` only grow. A waiter with ticket `t` is done once
//!   either is `>= t`; `durable` is checked first, so a later successful round wins.
//! - A writer wakes the committer only when the committer waits for that write
//!   (`Req::wake_at`), not on every write.
//! - Durable means sled's `flush()` and then `fsync` of sled's files and directories
//!   (sled 0.34.7 only calls `sync_file_range` on Linux, which leaves the device cache).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::StoreError;

/// The longest a round waits for the previous round's writers to come back.
const MAX_GATHER: Duration = Duration::from_millis(2);

/// What the committer has made durable so far (published to async waiters).
#[derive(Debug, Clone, Default)]
pub(super) struct Status {
    /// Every ticket `<= durable` is durable.
    durable: u64,
    /// Every ticket in `durable + 1 ..= failed` belongs to a round that failed.
    failed: u64,
    /// The error of the last failed round.
    error: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Req {
    /// Tickets handed out (the last one).
    written: u64,
    /// The last ticket the committer has handled (durable or failed).
    handled: u64,
    /// Set when the store is dropped: one last round, then exit.
    shutdown: bool,
    /// Commit rounds run.
    rounds: u64,
    /// The committer is asleep until `written` reaches this; a writer wakes it only then
    /// (a wake-up per write would cost a futex syscall each, mostly for nothing while a
    /// round is running).
    wake_at: u64,
}

/// Shared between writers, waiters and the committer thread.
#[derive(Debug)]
pub(super) struct Commits {
    req: Mutex<Req>,
    cv: Condvar,
    status: watch::Sender<Status>,
    /// The longest a round waits for the previous round's writers ([`MAX_GATHER`]).
    max_gather: Duration,
}

impl Commits {
    pub(super) fn new() -> Commits {
        Commits::with_max_gather(MAX_GATHER)
    }

    fn with_max_gather(max_gather: Duration) -> Commits {
        Commits {
            req: Mutex::new(Req::default()),
            cv: Condvar::new(),
            status: watch::Sender::new(Status::default()),
            max_gather,
        }
    }

    fn req(&self) -> MutexGuard<'_, Req> {
        // `Req` is three integers updated in one statement each: a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is still consistent.
        self.req.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a completed write; returns its ticket and wakes the committer.
    pub(super) fn register(&self) -> u64 {
        let mut r = self.req();
        r.written += 1;
        if r.written >= r.wake_at {
            r.wake_at = u64::MAX;
            self.cv.notify_one();
        }
        r.written
    }

    /// The ticket covering every write registered so far (wakes the committer if needed).
    pub(super) fn current(&self) -> u64 {
        let r = self.req();
        if r.written > r.handled {
            self.cv.notify_one();
        }
        r.written
    }

    /// Waits until `ticket` is durable.
    pub(super) async fn wait(&self, ticket: u64) -> Result<(), StoreError> {
        let mut rx = self.status.subscribe();
        let s = rx
            .wait_for(|s| s.durable >= ticket || s.failed >= ticket)
            .await
            .map_err(|_| StoreError::Closed)?;
        if s.durable >= ticket {
            Ok(())
        } else {
            let msg = s.error.as_deref().unwrap_or("unknown error").to_owned();
            Err(StoreError::Commit(msg))
        }
    }

    /// Asks the committer to do a last round and exit.
    pub(super) fn shutdown(&self) {
        self.req().shutdown = true;
        self.cv.notify_one();
    }

    /// The committer thread's body. `commit` makes everything written so far durable.
    ///
    /// Before a round it gathers: the writers woken by the previous round usually write
    /// again at once (a POD upload's next request, a burst of API calls), so it waits until
    /// as many new writes as that round held have arrived, or for at most that round's own
    /// duration. Without it, writers that come back while a round runs split into two
    /// cohorts that take turns, each round holding half of them. A lone writer never waits
    /// (its own write completes the count).
    pub(super) fn run(
        &self,
        interval: Duration,
        mut commit: impl FnMut() -> Result<(), StoreError>,
    ) {
        // Writes expected from the last round's writers coming back, and how long to wait.
        let mut expect = 0u64;
        let mut gather = Duration::ZERO;
        loop {
            let shutdown = {
                let mut r = self.req();
                while r.written <= r.handled && !r.shutdown {
                    r.wake_at = r.handled + 1;
                    r = self.cv.wait(r).unwrap_or_else(PoisonError::into_inner);
                }
                let until = Instant::now() + gather;
                while r.written < expect && !r.shutdown {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    r.wake_at = expect;
                    r = self
                        .cv
                        .wait_timeout(r, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                r.wake_at = u64::MAX;
                r.shutdown
            };
            // The group-commit window: let concurrent writers join this round.
            if !shutdown && !interval.is_zero() {
                std::thread::sleep(interval);
            }
            let (target, round) = {
                let r = self.req();
                (r.written, r.written - r.handled)
            };
            let started = Instant::now();
            let res = commit();
            gather = started.elapsed().min(self.max_gather);
            {
                let mut r = self.req();
                r.handled = target;
                r.rounds += 1;
                expect = r.written + round;
            }
            self.status.send_modify(|s| match &res {
                Ok(()) => s.durable = s.durable.max(target),
                Err(e) => {
                    s.failed = s.failed.max(target);
                    s.error = Some(Arc::from(e.to_string()));
                }
            });
            if let Err(e) = res {
                tracing::error!(error = %e, ticket = target, "store commit failed: events not durable");
            }
            if shutdown {
                return;
            }
        }
    }

    /// Commit rounds run so far.
    pub(super) fn rounds(&self) -> u64 {
        self.req().rounds
    }
}

/// Syncs all of sled's files (`db`, `conf`, `snap.*`, `blobs/*`) and the directories
/// holding them: [`sync_sled_changes`] with nothing synced before.
pub(super) fn sync_sled_dir(dir: &Path) -> Result<(), StoreError> {
    sync_sled_changes(dir, &mut SyncCache::default())
}

/// What the committer synced last round: files whose length and mtime have not changed
/// since need no new fsync, and the directories only when the set of files changed.
#[derive(Debug, Default)]
pub(super) struct SyncCache {
    files: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// Like [`sync_sled_dir`], but only what changed since the last successful round: `db` is
/// always `fdatasync`ed (sled appends to it), other files only when their length or mtime
/// changed, the directories only when files appeared or vanished. This is what keeps a
/// commit round near one `fdatasync` instead of a walk of full fsyncs.
pub(super) fn sync_sled_changes(dir: &Path, cache: &mut SyncCache) -> Result<(), StoreError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| StoreError::Io { path, source }
    };
    let mut now: HashMap<PathBuf, (u64, Option<SystemTime>)> =
        HashMap::with_capacity(cache.files.len() + 4);
    let blobs = dir.join("blobs");
    let mut listed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            listed.push(entry.path());
        }
    }
    match fs::read_dir(&blobs) {
        Ok(entries) => {
            for entry in entries {
                listed.push(entry.map_err(io_err(&blobs))?.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&blobs)(e)),
    }
    for path in listed {
        // A file sled removed while we look needs no sync; any other error means we
        // cannot say the store is durable (the hub's `make_durable` decides the same).
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let stamp = (meta.len(), meta.modified().ok());
        let is_db = path.file_name().is_some_and(|n| n == "db");
        if is_db || cache.files.get(&path) != Some(&stamp) {
            sync_data(&path)?;
        }
        now.insert(path, stamp);
    }
    let changed_set =
        now.len() != cache.files.len() || now.keys().any(|k| !cache.files.contains_key(k));
    if changed_set {
        if blobs.exists() {
            sync_path(&blobs)?;
        }
        sync_path(dir)?;
    }
    cache.files = now;
    Ok(())
}

fn sync_data(path: &Path) -> Result<(), StoreError> {
    match File::open(path).and_then(|f| f.sync_data()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// fsyncs one file or directory; one that vanished meanwhile (a replaced snapshot, a
/// removed blob) needs no sync.
pub(super) fn sync_path(path: &Path) -> Result<(), StoreError> {
    let res = File::open(path).and_then(|f| f.sync_all());
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The sync of sled's files, the same cases as the hub's `store::sled::durable`
    /// tests: a vanished file is skipped, a file whose metadata cannot be read is an error
    /// naming it (never a silent "durable").
    #[test]
    fn sync_skips_vanished_files_and_fails_on_unreadable_metadata() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(dir.path().join("conf"), b"conf").unwrap();
        let mut cache = SyncCache::default();
        sync_sled_changes(dir.path(), &mut cache).unwrap();
        assert_eq!(cache.files.len(), 2);
        // A snapshot sled removed since: nothing to sync, not an error.
        std::fs::remove_file(dir.path().join("conf")).unwrap();
        sync_sled_changes(dir.path(), &mut cache).unwrap();
        assert_eq!(cache.files.len(), 1);
        // A snapshot whose metadata cannot be read (a symlink loop: ELOOP).
        std::os::unix::fs::symlink("snap.loop", dir.path().join("snap.loop")).unwrap();
        let err = sync_sled_changes(dir.path(), &mut cache).unwrap_err();
        assert!(err.to_string().contains("snap.loop"), "{err}");
    }

    /// A committer whose rounds take `round` each; returns the shared state, the tickets
    /// each round covered (as seen by the commit closure) and the thread.
    fn committer(
        round: Duration,
    ) -> (
        Arc<Commits>,
        Arc<Mutex<Vec<u64>>>,
        std::thread::JoinHandle<()>,
    ) {
        let commits = Arc::new(Commits::with_max_gather(Duration::from_secs(5)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (Arc::clone(&commits), Arc::clone(&seen));
        let handle = std::thread::spawn(move || {
            let c2 = Arc::clone(&c);
            c.run(Duration::ZERO, || {
                s.lock().unwrap().push(c2.req().written);
                std::thread::sleep(round);
                Ok(())
            });
        });
        (commits, seen, handle)
    }

    fn wait_durable(c: &Commits, ticket: u64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(c.wait(ticket)).expect("durable");
    }

    /// Four writers, then their round.
    fn first_round_of_four(c: &Commits) {
        for _ in 0..4 {
            c.register();
        }
        wait_durable(c, 4);
    }

    #[test]
    fn a_round_waits_for_the_previous_rounds_writers_to_come_back() {
        let (c, seen, handle) = committer(Duration::from_millis(300));
        first_round_of_four(&c);
        assert_eq!(*seen.lock().unwrap(), [4]);
        // Three of the four writers come back at once, the fourth a little later, all well
        // within the gather window (one round, 300 ms): one round takes all four.
        for _ in 0..3 {
            c.register();
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            *seen.lock().unwrap(),
            [4],
            "no round started before the fourth is back"
        );
        let last = c.register();
        wait_durable(&c, last);
        assert_eq!(*seen.lock().unwrap(), [4, 8]);
        c.shutdown();
        handle.join().unwrap();
    }

    #[test]
    fn a_round_starts_after_the_window_when_writers_do_not_come_back() {
        let (c, seen, handle) = committer(Duration::from_millis(50));
        first_round_of_four(&c);
        // Only one of the four writes again: its round still runs, after the window.
        let t = c.register();
        wait_durable(&c, t);
        assert_eq!(*seen.lock().unwrap(), [4, 5]);
        c.shutdown();
        handle.join().unwrap();
    }

    #[test]
    fn a_lone_writer_never_waits_for_the_window() {
        let (c, _seen, handle) = committer(Duration::from_millis(400));
        let t = c.register();
        wait_durable(&c, t);
        // A round of one: the writer's next write completes the count, so the next round
        // starts at once instead of after the 400 ms window.
        let started = Instant::now();
        let t = c.register();
        wait_durable(&c, t);
        let took = started.elapsed();
        assert_eq!(c.rounds(), 2);
        assert!(
            took < Duration::from_millis(750),
            "one 400 ms round, not window + round: {took:?}"
        );
        c.shutdown();
        handle.join().unwrap();
    }
}
