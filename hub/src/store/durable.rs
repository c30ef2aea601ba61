//! What "durable" means for the hub's sled store, done incrementally.
//!
//! sled's `flush()` writes its log but on Linux only calls `sync_file_range`, which leaves
//! file metadata and the device cache. So after it, the files sled wrote are synced:
//!
//! - `db`, which every write appends to: `fdatasync` every round;
//! - `conf`, `snap.*` (written, then renamed into place) and `blobs/*` (values over sled's
//!   blob threshold, i.e. POD photos; written once, never synced by sled): synced when they
//!   appear or their length or mtime changed since their last sync, not every round, so a
//!   hub holding thousands of photos still does about one `fdatasync` per round;
//! - the directories, when the set of files in them changed (a rename or a new blob file
//!   is only durable once its directory entry is).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Each file's (length, mtime) at its last sync.
#[derive(Debug, Default)]
pub(super) struct Synced {
    files: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// Flushes sled, then syncs what changed in `dir` since the last successful call.
pub(super) fn make_durable(db: &sled::Db, dir: &Path, synced: &mut Synced) -> io::Result<()> {
    db.flush().map_err(io::Error::other)?;
    let blobs = dir.join("blobs");
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            files.push(entry.path());
        }
    }
    match fs::read_dir(&blobs) {
        Ok(entries) => {
            for entry in entries {
                files.push(entry?.path());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut now = HashMap::with_capacity(files.len());
    for path in files {
        // sled may remove an old snapshot or blob while we look: nothing to sync then.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let stamp = (meta.len(), meta.modified().ok());
        let is_log = path.file_name().is_some_and(|n| n == "db");
        if is_log || synced.files.get(&path) != Some(&stamp) {
            match File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        now.insert(path, stamp);
    }
    let set_changed =
        now.len() != synced.files.len() || now.keys().any(|k| !synced.files.contains_key(k));
    if set_changed {
        if blobs.exists() {
            File::open(&blobs)?.sync_all()?;
        }
        File::open(dir)?.sync_all()?;
    }
    synced.files = now;
    Ok(())
}
