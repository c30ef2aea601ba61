//! Wire cost of a realistic 1 Hz drive, fleetsync frames against JSON of the same fixes.
//!
//! `cargo bench -p fleetsync-protocol` prints bytes per fix for both and the ratio, then
//! encode/decode rates (criterion measures them; the summary line takes its own timing so
//! both rates come from the same run as the JSON baseline).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use fleetsync_protocol::json::EventJson;
use fleetsync_protocol::{Batch, Body, BoundedVec, Event, Fix, Uplink, frame};

const BATCH: usize = 60;

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
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Roughly normal, mean 0, sd 1.
    fn gauss(&mut self) -> f64 {
        (0..6).map(|_| self.unit()).sum::<f64>() - 3.0
    }
}

/// An hour of driving: urban blocks with turns and traffic lights, then highway.
fn drive(seconds: usize, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed | 1);
    let (mut lat, mut lon) = (52.370_216_f64, 4.895_168_f64);
    let mut heading = 90.0f64;
    let mut speed = 0.0f64;
    let mut target = 13.0f64;
    let mut t_ms: u64 = 1_795_773_600_000;
    let mut stopped_for = 0u32;
    let mut to_turn = 250.0f64;
    let mut turning = 0.0f64;
    let mut hdop = 0.9f64;
    let mut sats = 10u8;
    let mut out = Vec::with_capacity(seconds);
    for i in 0..seconds {
        let highway = i > seconds / 2;
        if stopped_for > 0 {
            stopped_for -= 1;
            target = 0.0;
            if stopped_for == 0 {
                target = if highway {
                    rng.range(26.0, 33.0)
                } else {
                    rng.range(9.0, 14.0)
                };
            }
        } else if !highway && rng.unit() < 1.0 / 90.0 {
            stopped_for = rng.range(15.0, 60.0) as u32; // a red light
        } else if rng.unit() < 0.05 {
            target = if highway {
                rng.range(26.0, 33.0)
            } else {
                rng.range(7.0, 14.0)
            };
        }
        let accel = (target - speed).clamp(-3.0, 2.0);
        speed = (speed + accel + 0.05 * rng.gauss()).max(0.0);
        if speed < 0.3 && target == 0.0 {
            speed = 0.0;
        }
        // Turns at intersections in town, gentle curves on the highway.
        to_turn -= speed;
        if to_turn <= 0.0 {
            turning = if highway {
                rng.range(-2.0, 2.0)
            } else {
                [-90.0, 90.0, 0.0][(rng.next() % 3) as usize]
            };
            to_turn = if highway {
                rng.range(800.0, 3000.0)
            } else {
                rng.range(120.0, 400.0)
            };
        }
        if speed > 0.5 {
            let step = turning.clamp(-15.0, 15.0);
            heading = (heading + step + 0.5 * rng.gauss()).rem_euclid(360.0);
            turning -= step;
        }
        let d = speed; // metres this second
        lat += d * heading.to_radians().cos() / 111_320.0;
        lon += d * heading.to_radians().sin() / (111_320.0 * lat.to_radians().cos());
        // Receiver noise: white, 0.3 m standard deviation per axis.
        let n_lat = 0.3 * rng.gauss() / 111_320.0;
        let n_lon = 0.3 * rng.gauss() / 111_320.0;
        if rng.unit() < 0.02 {
            hdop = rng.range(0.7, 1.6);
        }
        if rng.unit() < 0.01 {
            sats = (sats as i32 + if rng.unit() < 0.5 { -1 } else { 1 }).clamp(4, 16) as u8;
        }
        out.push(Event {
            time_ms: t_ms,
            body: Body::Position(Fix {
                lat_e7: ((lat + n_lat) * 1e7).round() as i32,
                lon_e7: ((lon + n_lon) * 1e7).round() as i32,
                speed_cmps: Some((speed * 100.0).round() as u16),
                heading_ddeg: Some((heading * 10.0).round() as u16 % 3600),
                hdop_d: Some((hdop * 10.0).round() as u16),
                satellites: Some(sats),
            }),
        });
        t_ms += 1000;
    }
    out
}

fn batches(events: &[Event]) -> Vec<Uplink> {
    events
        .chunks(BATCH)
        .enumerate()
        .map(|(i, c)| {
            Uplink::Batch(Batch {
                epoch: 1,
                first_seq: (i * BATCH) as u64,
                events: BoundedVec::try_from_slice(c).expect("60 fit in a batch"),
            })
        })
        .collect()
}

fn rate(per_round: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut rounds = 0usize;
    while start.elapsed() < Duration::from_millis(700) {
        f();
        rounds += 1;
    }
    (rounds * per_round) as f64 / start.elapsed().as_secs_f64()
}

fn summary(events: &[Event]) {
    let msgs = batches(events);
    let frames: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| frame::encode(m).expect("encodes"))
        .collect();
    let wire: usize = frames.iter().map(Vec::len).sum();
    let json: usize = events
        .chunks(BATCH)
        .map(|c| {
            let v: Vec<EventJson> = c.iter().map(EventJson::from_event).collect();
            serde_json::to_vec(&v).expect("json").len()
        })
        .sum();
    let n = events.len() as f64;
    let enc = rate(events.len(), || {
        for m in &msgs {
            black_box(frame::encode(black_box(m)).expect("encodes"));
        }
    });
    let dec = rate(events.len(), || {
        for f in &frames {
            black_box(frame::decode::<Uplink>(black_box(f)).expect("decodes"));
        }
    });
    let json_enc = rate(events.len(), || {
        for c in events.chunks(BATCH) {
            let v: Vec<EventJson> = c.iter().map(EventJson::from_event).collect();
            black_box(serde_json::to_vec(&v).expect("json"));
        }
    });
    println!(
        "1 Hz drive, {} fixes in batches of {BATCH} (frame overhead included):",
        events.len()
    );
    println!("  fleetsync  {:6.2} bytes/fix", wire as f64 / n);
    println!("  JSON       {:6.2} bytes/fix", json as f64 / n);
    println!(
        "  ratio      {:6.1}x smaller than JSON",
        json as f64 / wire as f64
    );
    println!(
        "  encode     {:6.2} M fixes/s ({:.1}x JSON's {:.2} M/s); decode {:.2} M fixes/s",
        enc / 1e6,
        enc / json_enc,
        json_enc / 1e6,
        dec / 1e6
    );
}

fn bench(c: &mut Criterion) {
    let events = drive(3600, 7);
    let msgs = batches(&events);
    let frames: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| frame::encode(m).expect("encodes"))
        .collect();
    let mut g = c.benchmark_group("drive_1h");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            for m in &msgs {
                black_box(frame::encode(black_box(m)).expect("encodes"));
            }
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(frame::decode::<Uplink>(black_box(f)).expect("decodes"));
            }
        })
    });
    g.bench_function("json_encode", |b| {
        b.iter(|| {
            for ch in events.chunks(BATCH) {
                let v: Vec<EventJson> = ch.iter().map(EventJson::from_event).collect();
                black_box(serde_json::to_vec(&v).expect("json"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    summary(&drive(3600, 7));
    benches();
    Criterion::default().configure_from_args().final_summary();
}
