//! Durable append rate of the agent's store against the physical floor of the same disk.
//!
//! `cargo bench -p fleetsync-agent --bench append` prints, for 1, 16 and 64 concurrent
//! tokio appenders of a realistic event mix (1 Hz drive fixes, one exception in 20):
//!
//! - store:    events/s of `Store::append(ev).await` (returns after the group commit's
//!   sled flush + fsync), with the agent's settings (no fixed commit window);
//! - baseline: events/s of the same events' postcard bytes appended to a plain file with
//!   `write_all` per event and one `File::sync_data` per group of the same size;
//! - the ratio store / baseline (target: >= 0.5x);
//! - events per commit round of the store (the group commit's batching; the baseline's
//!   group is the appender count, the most a round can hold when each appender has one
//!   event in flight).
//!
//! Store and baseline run in alternating rounds (the median round counts), because these
//! machines are noisy. Criterion then measures the same operations on its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use fleetsync_agent::store::{Store, StoreConfig};
use fleetsync_protocol::{Body, BoundedString, Event, Exception, Fix};

/// The concurrency levels measured.
const LEVELS: [usize; 3] = [1, 16, 64];
/// The group-commit window: none, as `fleetsync_agent::start` runs the store.
const COMMIT_INTERVAL: Duration = Duration::ZERO; // as the agent runs it
/// Length of one measured round.
const ROUND: Duration = Duration::from_millis(1500);
/// Rounds per side and level (the median is reported).
const ROUNDS: usize = 3;
/// Events generated (appenders cycle through them).
const EVENTS: usize = 4096;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        (0..6).map(|_| self.unit()).sum::<f64>() - 3.0
    }
}

/// A 1 Hz drive through town (speed changes, turns, receiver noise); every 20th event is
/// an exception instead of a fix.
fn events(n: usize, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed | 1);
    let (mut lat, mut lon) = (52.370_216_f64, 4.895_168_f64);
    let (mut heading, mut speed, mut target) = (90.0f64, 0.0f64, 12.0f64);
    let mut t_ms: u64 = 1_795_773_600_000;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if rng.unit() < 0.05 {
            target = 6.0 + 8.0 * rng.unit();
        }
        if rng.unit() < 0.01 {
            target = 0.0;
        }
        speed = (speed + (target - speed).clamp(-3.0, 2.0) + 0.05 * rng.gauss()).max(0.0);
        if rng.unit() < 0.01 {
            heading = (heading + [-90.0, 90.0][(rng.next() % 2) as usize]).rem_euclid(360.0);
        }
        heading = (heading + 0.5 * rng.gauss()).rem_euclid(360.0);
        lat += speed * heading.to_radians().cos() / 111_320.0;
        lon += speed * heading.to_radians().sin() / (111_320.0 * lat.to_radians().cos());
        let body = if i % 20 == 19 {
            Body::Exception(Exception {
                code: BoundedString::try_from_str("traffic_delay").unwrap(),
                text: BoundedString::try_from_str(&format!(
                    "Stuck behind a road closure at stop {}, about 15 min late",
                    i / 20
                ))
                .unwrap(),
                stop_id: Some(BoundedString::try_from_str(&format!("S-{}", i / 200)).unwrap()),
            })
        } else {
            Body::Position(Fix {
                lat_e7: ((lat + 0.3 * rng.gauss() / 111_320.0) * 1e7).round() as i32,
                lon_e7: ((lon + 0.3 * rng.gauss() / 111_320.0) * 1e7).round() as i32,
                speed_cmps: Some((speed * 100.0).round() as u16),
                heading_ddeg: Some((heading * 10.0).round() as u16 % 3600),
                hdop_d: Some(9),
                satellites: Some(10),
            })
        };
        out.push(Event {
            time_ms: t_ms,
            body,
        });
        t_ms += 1000;
    }
    out
}

fn open_store(dir: &Path) -> Store {
    Store::open(StoreConfig {
        path: dir.to_path_buf(),
        quota_bytes: 1 << 30,
        space_factor: fleetsync_agent::store::SLED_SPACE_FACTOR,
        commit_interval: COMMIT_INTERVAL,
    })
    .expect("store opens")
}

/// `appenders` tasks call `append` until `deadline` (or until `budget` events are taken);
/// returns (events appended, elapsed).
async fn store_round(
    store: &Store,
    evs: &Arc<Vec<Event>>,
    appenders: usize,
    deadline: Option<Instant>,
    budget: Option<u64>,
) -> (u64, Duration) {
    let started = Instant::now();
    let taken = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(appenders);
    for _ in 0..appenders {
        let (store, evs, taken, done, next) = (
            store.clone(),
            evs.clone(),
            taken.clone(),
            done.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                if let Some(b) = budget
                    && taken.fetch_add(1, Ordering::Relaxed) >= b
                {
                    return;
                }
                let ev = evs[next.fetch_add(1, Ordering::Relaxed) % evs.len()].clone();
                store.append(ev).await.expect("append");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("appender task");
    }
    (done.load(Ordering::Relaxed), started.elapsed())
}

/// The physical floor: per group of `group` events, `write_all` each event's postcard
/// bytes, then one `sync_data`. Returns (events written, elapsed).
fn baseline_round(
    file: &mut File,
    evs: &[Event],
    group: usize,
    deadline: Option<Instant>,
    budget: Option<u64>,
) -> (u64, Duration) {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut n = 0u64;
    let mut i = 0usize;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) || budget.is_some_and(|b| n >= b) {
            break;
        }
        // The last group of a budgeted run may be short, so exactly `budget` are written.
        let len = budget.map_or(group, |b| group.min((b - n) as usize));
        for _ in 0..len {
            let bytes = postcard::to_slice(&evs[i % evs.len()], &mut buf).expect("encodes");
            file.write_all(bytes).expect("write");
            i += 1;
        }
        file.sync_data().expect("sync_data");
        n += len as u64;
    }
    (n, started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summary(rt: &tokio::runtime::Runtime, evs: &Arc<Vec<Event>>) {
    let sample = &evs[..20];
    let bytes: usize = sample
        .iter()
        .map(|e| postcard::to_stdvec(e).expect("encodes").len())
        .sum();
    println!(
        "Store::append durability rate ({} events cycled: 19 fixes + 1 exception per 20, \
         {:.1} postcard bytes/event on average; commit window {} ms; {} rounds of {} ms, median)",
        evs.len(),
        bytes as f64 / sample.len() as f64,
        COMMIT_INTERVAL.as_millis(),
        ROUNDS,
        ROUND.as_millis()
    );
    println!(
        "  {:>9}  {:>14}  {:>20}  {:>7}  {:>6}  {:>12}",
        "appenders", "store ev/s", "write+sync_data ev/s", "ratio", "target", "events/round"
    );
    for &n in &LEVELS {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(&dir.path().join("store"));
        let mut file = File::create(dir.path().join("baseline.log")).expect("file");
        // Warm both (file creation, sled's first segment).
        rt.block_on(store_round(
            &store,
            evs,
            n,
            Some(Instant::now() + Duration::from_millis(200)),
            None,
        ));
        baseline_round(
            &mut file,
            evs,
            n,
            Some(Instant::now() + Duration::from_millis(200)),
            None,
        );
        let (mut s_rates, mut b_rates) = (Vec::new(), Vec::new());
        let (mut events, rounds_before) = (0u64, store.stats().commit_rounds);
        for _ in 0..ROUNDS {
            let (done, el) = rt.block_on(store_round(
                &store,
                evs,
                n,
                Some(Instant::now() + ROUND),
                None,
            ));
            events += done;
            s_rates.push(done as f64 / el.as_secs_f64());
            let (done, el) = baseline_round(&mut file, evs, n, Some(Instant::now() + ROUND), None);
            b_rates.push(done as f64 / el.as_secs_f64());
        }
        let (s, b) = (median(s_rates.clone()), median(b_rates.clone()));
        let ratio = s / b;
        let per_round = events as f64 / (store.stats().commit_rounds - rounds_before) as f64;
        println!(
            "  {n:>9}  {s:>14.0}  {b:>20.0}  {ratio:>6.2}x  {:>6}  {per_round:>12.1}",
            if ratio >= 0.5 { "met" } else { "MISSED" }
        );
        println!(
            "  {:>9}  rounds: store {:?}  baseline {:?}",
            "",
            s_rates.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
            b_rates.iter().map(|r| r.round() as u64).collect::<Vec<_>>()
        );
        // Dropping the store does one last commit round and joins its thread.
        drop(store);
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let evs = Arc::new(events(EVENTS, 7));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("append");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &n in &LEVELS {
        g.throughput(Throughput::Elements(1));
        let store = open_store(&dir.path().join(format!("store-{n}")));
        g.bench_function(format!("store/{n}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(store_round(&store, &evs, n, None, Some(iters)))
                    .1
            })
        });
        drop(store);
        let mut file = File::create(dir.path().join(format!("baseline-{n}.log"))).expect("file");
        g.bench_function(format!("baseline/{n}"), |b| {
            b.iter_custom(|iters| baseline_round(&mut file, &evs, n, None, Some(iters)).1)
        });
    }
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let evs = Arc::new(events(EVENTS, 7));
    summary(&rt, &evs);
    drop(rt);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
