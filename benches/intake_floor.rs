//! Benchmark (not a test): the CPU one core spends per event on each step of the
//! intake path, in-process and without the network, beside the floor of reading
//! the same bytes with serde_json (validate only) and with sonic-rs (SIMD, into its
//! own tree). It answers "how far can the embedded default go on this machine?":
//! the sum of the steps is what a server must spend before TCP, HTTP and the disk.
//!
//!     cargo bench --bench intake_floor
//!
//! The body has the load generator's shape: 100 track events of ~420 bytes, unique ids.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater::config::LimitsConfig;
use breakwater::dedup::{DedupKey, LocalDedup};
use breakwater::intake::segment::{normalize, parse_batch, RequestContext};

/// The server's allocator, so allocation costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS_PER_BODY: usize = 100;
const BODIES: usize = 64;

fn track_event(sequence: usize) -> String {
    let user = sequence % 1000;
    serde_json::json!({
        "type": "track",
        "messageId": format!("floor-{sequence}"),
        "userId": format!("user-{user}"),
        "anonymousId": format!("anon-{user}"),
        "event": "Product Viewed",
        "properties": {"product_id": format!("sku-{}", sequence % 97), "category": "outdoor",
                       "price": 129.99, "currency": "EUR", "position": sequence % 10},
        "context": {"library": {"name": "analytics-python", "version": "2.3.2"}, "ip": "192.0.2.10",
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36", "locale": "de-DE"},
        "timestamp": "2024-05-01T12:00:00.000Z",
    })
    .to_string()
}

/// The bodies, `{KEY:[…]}`, where KEY is `"batch"` as written or escaped.
fn batch_bodies(key: &str) -> Vec<Vec<u8>> {
    (0..BODIES)
        .map(|body| {
            let events: Vec<String> = (0..EVENTS_PER_BODY)
                .map(|i| track_event(body * EVENTS_PER_BODY + i))
                .collect();
            format!("{{{key}:[{}]}}", events.join(",")).into_bytes()
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct RawItems<'a> {
    #[serde(borrow)]
    batch: Vec<&'a serde_json::value::RawValue>,
}

/// What a sonic-rs based intake would do at least: its tree of the whole body, then
/// every item's top-level fields as compact JSON side by side, sorted by key.
fn sonic_fields_copied(body: &[u8]) -> usize {
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    let tree: sonic_rs::Value = sonic_rs::from_slice(body).unwrap();
    let mut copied = 0;
    for item in tree.get("batch").and_then(|batch| batch.as_array()).unwrap().iter() {
        let mut values = Vec::with_capacity(512);
        let mut fields = Vec::with_capacity(16);
        for (key, value) in item.as_object().unwrap().iter() {
            let start = values.len();
            sonic_rs::to_writer(&mut values, value).unwrap();
            fields.push((key, start..values.len()));
        }
        fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
        copied += fields.len() + values.len();
    }
    copied
}

/// Runs `step` (one request's worth of events per call) in five windows of 200 ms
/// and prints the nanoseconds per event of the quickest window: other work on the
/// machine only ever adds.
fn measure(name: &str, mut step: impl FnMut() -> usize) {
    let mut check = 0usize;
    for _ in 0..BODIES {
        check = check.wrapping_add(step());
    }
    let mut quickest = f64::INFINITY;
    for _ in 0..5 {
        let (mut calls, started) = (0usize, Instant::now());
        while started.elapsed() < Duration::from_millis(200) {
            check = check.wrapping_add(step());
            calls += 1;
        }
        let per_event = started.elapsed().as_nanos() as f64 / (calls * EVENTS_PER_BODY) as f64;
        quickest = quickest.min(per_event);
    }
    println!("{name:<64} {quickest:>7.0} ns/event");
    black_box(check);
}

/// The bodies one after another, round and round.
fn cycling<'b>(bodies: &'b [Vec<u8>]) -> impl FnMut() -> &'b [u8] {
    let mut next = bodies.iter().cycle();
    move || next.next().expect("at least one body")
}

fn main() {
    let bodies = batch_bodies(r#""batch""#);
    // `batch` spelled with an escape: the one-pass read declines it.
    let general_bodies = batch_bodies(r#""\u0062atch""#);
    let limits = LimitsConfig::default();
    println!(
        "{} bodies of {} events, {} bytes per event; one core, one thread",
        BODIES,
        EVENTS_PER_BODY,
        bodies[0].len() / EVENTS_PER_BODY
    );
    let mut body = cycling(&bodies);
    measure("serde_json: validate only (IgnoredAny)", || {
        serde_json::from_slice::<serde::de::IgnoredAny>(body())
            .map(|_| 1)
            .unwrap()
    });
    measure("sonic-rs: the whole body into its tree", || {
        sonic_rs::from_slice::<sonic_rs::Value>(body()).map(|_| 1).unwrap()
    });
    measure("sonic-rs: tree + each item's fields copied compact", || {
        sonic_fields_copied(body())
    });
    measure("serde_json: split into raw items (the general way's 1st pass)", || {
        serde_json::from_slice::<RawItems>(body()).unwrap().batch.len()
    });
    measure("breakwater: parse_batch, one pass (the common shape)", || {
        parse_batch(body(), &limits).unwrap().events.len()
    });
    let mut general_body = cycling(&general_bodies);
    measure(
        "breakwater: parse_batch, split first (a body one pass declines)",
        || parse_batch(general_body(), &limits).unwrap().events.len(),
    );
    let received_at = chrono::Utc::now();
    measure("breakwater: parse_batch + normalize", || {
        let parsed = parse_batch(body(), &limits).unwrap();
        let request = RequestContext {
            route_type: None,
            sent_at: parsed.sent_at,
            context: parsed.context.as_ref(),
            received_at,
            source: "bench",
            client_fields: &[],
        };
        parsed
            .events
            .into_iter()
            .map(|event| normalize(event.unwrap(), &request).unwrap().json.len())
            .sum()
    });
    let ids: Vec<Vec<String>> = (0..BODIES * 4)
        .map(|body| (0..EVENTS_PER_BODY).map(|i| format!("floor-{body}-{i}")).collect())
        .collect();
    let mut next_ids = ids.iter().cycle();
    measure("breakwater: DedupKey::new (SHA-256) per id", || {
        let request_ids = next_ids.next().expect("ids");
        for id in request_ids {
            black_box(DedupKey::new("bench", id));
        }
        request_ids.len()
    });
    // The embedded default's seen set holds at most 1,000,000 ids: fill it, then
    // every commit also evicts the oldest, as under sustained load. Every id is new.
    let dedup = Arc::new(LocalDedup::new(Duration::from_secs(86_400), 1_000_000));
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut keys = (0u64..).map(|sequence| DedupKey::new("bench", &sequence.to_string()));
    let mut next_request = move || -> Vec<DedupKey> { keys.by_ref().take(EVENTS_PER_BODY).collect() };
    for _ in 0..1_000_000 / EVENTS_PER_BODY {
        runtime.block_on(dedup.reserve(&next_request())).commit();
    }
    // Prepared beforehand (the key's hash is measured above): enough for the five
    // windows down to about 70 ns per id, a third of what this step costs here.
    let requests: Vec<Vec<DedupKey>> = (0..150_000).map(|_| next_request()).collect();
    let mut requests = requests.into_iter();
    measure("breakwater: seen set reserve + commit (1,000,000 held)", || {
        let keys = requests.next().expect("enough prepared requests");
        let reservation = runtime.block_on(dedup.reserve(&keys));
        let new = reservation.verdicts().len();
        reservation.commit();
        new
    });
}
