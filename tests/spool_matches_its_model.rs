//! Model-based test of the spool: random sequences of append, ack (delete the
//! oldest after "delivery"), and reopen (a process restart), checked after every
//! step against a plain queue. No acknowledged append is ever lost; no record is
//! handed out again after its ack; order is kept. (A real `kill -9` is proved by
//! `clickhouse_outage_spools_then_replays`.)

use std::collections::VecDeque;
use std::sync::Arc;

use breakwater::event::SinkBatch;
use breakwater::event::{NormalizedEvent, SinkKind};
use breakwater::spool::Spool;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Append(usize),
    Ack(usize),
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (1usize..20).prop_map(Step::Append),
        3 => (1usize..4).prop_map(Step::Ack),
        1 => Just(Step::Reopen),
    ]
}

fn batch(record: u64, events: usize) -> Arc<SinkBatch> {
    Arc::new(SinkBatch::new(
        Arc::from("web"),
        (0..events)
            .map(|i| NormalizedEvent {
                user_id: Some("u".into()),
                anonymous_id: None,
                timestamp_ms: 1,
                received_at_ms: 2,
                ..NormalizedEvent::fixture(
                    &format!("r{record}-e{i}"),
                    format!("{{\"r\":{record},\"e\":{i}}}").as_bytes(),
                )
            })
            .collect(),
    ))
}

/// Record ids in the spool, oldest first.
fn stored(spool: &Spool) -> Vec<u64> {
    spool
        .queue(SinkKind::ClickHouse)
        .unwrap()
        .read_oldest(usize::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|s| {
            s.batch.events[0].message_id[1..]
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn open(dir: &std::path::Path) -> Spool {
    Spool::open(dir, &[(SinkKind::ClickHouse, 1 << 30)]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_spool_behaves_like_a_queue(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut spool = runtime.block_on(async { open(dir.path()) });
        let mut model: VecDeque<(u64, usize)> = VecDeque::new();
        let mut next_record = 0u64;
        for step in steps {
            match step {
                Step::Append(events) => {
                    next_record += 1;
                    let queue = spool.queue(SinkKind::ClickHouse).unwrap();
                    runtime.block_on(queue.append(batch(next_record, events))).unwrap();
                    model.push_back((next_record, events));
                }
                Step::Ack(count) => {
                    let queue = spool.queue(SinkKind::ClickHouse).unwrap();
                    let oldest = queue.read_oldest(usize::MAX, count).unwrap();
                    let handed_out: Vec<u64> = oldest
                        .iter()
                        .map(|s| s.batch.events[0].message_id[1..].split('-').next().unwrap().parse().unwrap())
                        .collect();
                    let expected: Vec<u64> = model.iter().take(count).map(|(r, _)| *r).collect();
                    prop_assert_eq!(&handed_out, &expected, "oldest records handed out");
                    let keys: Vec<_> = oldest.iter().map(|s| s.record_key()).collect();
                    queue.remove_keys(&keys).unwrap();
                    for _ in 0..handed_out.len() {
                        model.pop_front();
                    }
                }
                Step::Reopen => {
                    runtime.block_on(spool.close());
                    spool = runtime.block_on(async { open(dir.path()) });
                }
            }
            let expected: Vec<u64> = model.iter().map(|(r, _)| *r).collect();
            prop_assert_eq!(stored(&spool), expected, "spool contents vs model");
            let events: usize = model.iter().map(|(_, e)| e).sum();
            prop_assert_eq!(spool.queue(SinkKind::ClickHouse).unwrap().events(), events as u64, "event count");
        }
    }
}

#[test]
fn a_spool_in_use_is_refused_never_set_aside() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = runtime.block_on(async { open(dir.path()) });
    runtime
        .block_on(spool.queue(SinkKind::ClickHouse).unwrap().append(batch(1, 3)))
        .unwrap();
    let second = runtime.block_on(async { Spool::open(dir.path(), &[(SinkKind::ClickHouse, 1 << 30)]) });
    assert!(second.is_err(), "a second open must fail");
    assert_eq!(stored(&spool), [1], "the first spool keeps its records");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "nothing was moved aside: {names:?}");
}

#[test]
fn a_corrupt_record_is_quarantined_and_start_up_goes_on() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = runtime.block_on(async { open(dir.path()) });
    let queue = spool.queue(SinkKind::ClickHouse).unwrap();
    runtime.block_on(queue.append(batch(1, 2))).unwrap();
    runtime.block_on(queue.append(batch(2, 2))).unwrap();
    drop(queue);
    runtime.block_on(spool.close());
    // Damage record 2 behind the spool's back (a flipped byte in its body).
    {
        let db = redb::Database::create(dir.path().join("spool.redb")).unwrap();
        use redb::ReadableTable;
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("spool.clickhouse");
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(table).unwrap();
            let mut value = records.get(2).unwrap().unwrap().value().to_vec();
            let last = value.len() - 1;
            value[last] ^= 0xff;
            records.insert(2, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let spool = runtime.block_on(async { open(dir.path()) });
    assert_eq!(stored(&spool), [1], "the good record stays, the bad one left the queue");
    assert_eq!(spool.quarantined().unwrap(), 1, "the bad record is kept in quarantine");
}

/// After a full-disk episode a record could be counted off twice (a commit that
/// reported failure yet reached the disk, then its deletion): the byte counter
/// wrapped below zero and `is_full()` stayed true until a restart (issue 19, i).
#[test]
fn a_counter_taken_below_zero_stops_at_zero_and_the_queue_is_not_full_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let spool = runtime.block_on(async { open(dir.path()) });
    let queue = spool.queue(SinkKind::ClickHouse).unwrap();
    runtime.block_on(queue.append(batch(1, 3))).unwrap();
    let stored = queue.read_oldest(usize::MAX, usize::MAX).unwrap();
    let mut counted_twice = stored[0].record_key();
    counted_twice.stored_bytes += 1_000_000;
    counted_twice.events += 5;
    queue.remove_keys(&[counted_twice]).unwrap();
    let stats = queue.stats();
    assert!(!queue.is_full(), "{stats:?}");
    assert_eq!((stats.bytes, stats.events, stats.records), (0, 0, 0), "{stats:?}");
}
