//! Duplicate detection on `(source, messageId)`. Owns the embedded (in-process) seen
//! set; calls nothing. Invariant: an id becomes "seen" only when its request commits
//! after its events are durable, so a failed or crashed request never blocks a retry.
//! While a request is in flight its ids are "pending": a concurrent request carrying
//! one of them waits for the outcome instead of writing a second copy.

pub mod redis;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::telemetry::metric;

/// 128 bits of SHA-256 over source and messageId: fixed-size entries, and ids an
/// attacker picks cannot be steered into colliding with someone else's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupKey(u128);

impl DedupKey {
    pub fn new(source: &str, message_id: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(source.as_bytes());
        hasher.update([0u8]);
        hasher.update(message_id.as_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        DedupKey(u128::from_le_bytes(first))
    }

    fn shard(self, shards: usize) -> usize {
        (self.0 as usize) % shards
    }
}

/// Hashes a `DedupKey` by its upper 64 bits. The key is already a SHA-256 digest,
/// uniform and not steerable by senders, so hashing it again (SipHash) only cost
/// time on the intake path; the lower bits choose the shard.
#[derive(Default)]
struct DedupKeyHasher(u64);

impl std::hash::Hasher for DedupKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if `DedupKey`'s Hash changes; still a valid hash.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = (value >> 64) as u64;
    }
}

type KeyMap<V> = HashMap<DedupKey, V, std::hash::BuildHasherDefault<DedupKeyHasher>>;

/// Whether an event of a request must be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
}

const SHARDS: usize = 64;

/// The embedded seen set: bounded by a time window and an entry count.
pub struct LocalDedup {
    shards: Box<[Mutex<Shard>]>,
    window_seconds: u64,
    max_entries_per_shard: usize,
    next_owner: AtomicU64,
    entries: AtomicUsize,
}

#[derive(Default)]
struct Shard {
    /// Committed ids and the second they were seen.
    seen: KeyMap<u64>,
    /// Commit order, oldest first, for expiry and the size bound.
    order: VecDeque<(u64, DedupKey)>,
    /// Ids of requests in flight; the receiver closes when that request ends.
    pending: KeyMap<Pending>,
}

struct Pending {
    owner: u64,
    finished: watch::Receiver<()>,
}

impl LocalDedup {
    pub fn new(window: Duration, max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            window_seconds: window.as_secs().max(1),
            max_entries_per_shard: max_entries.div_ceil(SHARDS).max(1),
            next_owner: AtomicU64::new(1),
            entries: AtomicUsize::new(0),
        }
    }

    fn shard(&self, key: DedupKey) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock cannot leave it half-updated in a way
        // that matters more than refusing all traffic would, so recover the guard.
        self.shards[key.shard(SHARDS)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Number of committed ids remembered.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers an id found durable at start-up (from the sink's files).
    pub fn restore(&self, key: DedupKey, seen_at_unix_seconds: u64) {
        if seen_at_unix_seconds + self.window_seconds <= now_unix_seconds() {
            return;
        }
        let evicted_early = self.insert_seen(&mut self.shard(key), key, seen_at_unix_seconds, now_unix_seconds());
        metrics::counter!(metric::DEDUP_EVICTED_EARLY).increment(evicted_early);
    }

    /// Claims the ids of one request. Returns a verdict per key, in order: an id
    /// already seen, or repeated earlier in the same request, is a duplicate. If
    /// another request holds one of the ids, this waits for that request to finish
    /// (holding nothing meanwhile, so two requests can never wait on each other).
    pub async fn reserve(self: &Arc<Self>, keys: &[DedupKey]) -> Reservation {
        let owner = self.next_owner.fetch_add(1, Ordering::Relaxed);
        let (finished_sender, finished) = watch::channel(());
        loop {
            let now = now_unix_seconds();
            let mut verdicts = Vec::with_capacity(keys.len());
            let mut reserved = Vec::with_capacity(keys.len());
            let mut blocked_by = None;
            for &key in keys {
                let mut shard = self.shard(key);
                if self.is_seen(&mut shard, key, now) {
                    verdicts.push(Verdict::Duplicate);
                    continue;
                }
                match shard.pending.get(&key) {
                    Some(pending) if pending.owner == owner => verdicts.push(Verdict::Duplicate),
                    Some(pending) => {
                        blocked_by = Some(pending.finished.clone());
                        break;
                    }
                    None => {
                        shard.pending.insert(
                            key,
                            Pending {
                                owner,
                                finished: finished.clone(),
                            },
                        );
                        reserved.push(key);
                        verdicts.push(Verdict::New);
                    }
                }
            }
            match blocked_by {
                None => {
                    return Reservation {
                        dedup: self.clone(),
                        owner,
                        reserved,
                        verdicts,
                        _finished: finished_sender,
                        committed: false,
                    };
                }
                Some(mut other) => {
                    self.release(owner, &reserved);
                    metrics::counter!(metric::DEDUP_WAITS).increment(1);
                    // Resolves when the other request commits or gives up.
                    let _ = other.changed().await;
                }
            }
        }
    }

    fn is_seen(&self, shard: &mut Shard, key: DedupKey, now: u64) -> bool {
        match shard.seen.get(&key) {
            Some(&seen_at) if seen_at + self.window_seconds > now => true,
            Some(_) => {
                shard.seen.remove(&key);
                self.entries.fetch_sub(1, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    fn release(&self, owner: u64, keys: &[DedupKey]) {
        for &key in keys {
            remove_pending(&mut self.shard(key), key, owner);
        }
    }

    fn commit(&self, owner: u64, keys: &[DedupKey]) {
        let now = now_unix_seconds();
        let mut evicted_early = 0;
        for &key in keys {
            let mut shard = self.shard(key);
            remove_pending(&mut shard, key, owner);
            evicted_early += self.insert_seen(&mut shard, key, now, now);
        }
        metrics::counter!(metric::DEDUP_EVICTED_EARLY).increment(evicted_early);
        metrics::gauge!(metric::DEDUP_ENTRIES).set(self.len() as f64);
    }

    /// Marks `key` seen and forgets what expired or overflows the bound; returns how
    /// many ids were forgotten before their window ended (for the caller to count
    /// once, not per id).
    fn insert_seen(&self, shard: &mut Shard, key: DedupKey, seen_at: u64, now: u64) -> u64 {
        let mut evicted_early = 0;
        if shard.seen.insert(key, seen_at).is_none() {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        shard.order.push_back((seen_at, key));
        while let Some(&(oldest_at, oldest)) = shard.order.front() {
            let expired = oldest_at + self.window_seconds <= now;
            if !expired && shard.order.len() <= self.max_entries_per_shard {
                break;
            }
            shard.order.pop_front();
            // Only forget the id if this queue entry is its latest sighting (one
            // lookup: the set is large, and each lookup is a cache miss).
            if let Entry::Occupied(entry) = shard.seen.entry(oldest) {
                if *entry.get() != oldest_at {
                    continue;
                }
                entry.remove();
                self.entries.fetch_sub(1, Ordering::Relaxed);
                if !expired {
                    evicted_early += 1;
                }
            }
        }
        evicted_early
    }
}

/// Drops `key`'s in-flight mark if `owner` holds it.
fn remove_pending(shard: &mut Shard, key: DedupKey, owner: u64) {
    if let Entry::Occupied(entry) = shard.pending.entry(key) {
        if entry.get().owner == owner {
            entry.remove();
        }
    }
}

/// The ids one request holds while its events are made durable. `commit` marks the
/// new ones seen; dropping it uncommitted releases them for a retry.
pub struct Reservation {
    dedup: Arc<LocalDedup>,
    owner: u64,
    reserved: Vec<DedupKey>,
    verdicts: Vec<Verdict>,
    /// Dropped with the reservation, which wakes requests waiting on these ids.
    _finished: watch::Sender<()>,
    committed: bool,
}

impl Reservation {
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts
    }

    /// Call only once every new event is durable.
    pub fn commit(mut self) {
        self.dedup.commit(self.owner, &self.reserved);
        self.committed = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.committed {
            self.dedup.release(self.owner, &self.reserved);
        }
    }
}

fn now_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedup() -> Arc<LocalDedup> {
        Arc::new(LocalDedup::new(Duration::from_secs(3600), 1000))
    }

    fn keys(ids: &[&str]) -> Vec<DedupKey> {
        ids.iter().map(|id| DedupKey::new("web", id)).collect()
    }

    #[tokio::test]
    async fn committed_ids_are_duplicates_and_repeats_within_a_request_too() {
        let dedup = dedup();
        let first = dedup.reserve(&keys(&["a", "b", "a"])).await;
        assert_eq!(first.verdicts(), [Verdict::New, Verdict::New, Verdict::Duplicate]);
        first.commit();
        let second = dedup.reserve(&keys(&["a", "c"])).await;
        assert_eq!(second.verdicts(), [Verdict::Duplicate, Verdict::New]);
        assert_eq!(dedup.len(), 2);
    }

    #[tokio::test]
    async fn an_abandoned_request_leaves_its_ids_free() {
        let dedup = dedup();
        drop(dedup.reserve(&keys(&["a"])).await);
        let retry = dedup.reserve(&keys(&["a"])).await;
        assert_eq!(retry.verdicts(), [Verdict::New]);
    }

    #[tokio::test]
    async fn sources_do_not_share_ids() {
        let dedup = dedup();
        dedup.reserve(&[DedupKey::new("web", "a")]).await.commit();
        let other = dedup.reserve(&[DedupKey::new("ios", "a")]).await;
        assert_eq!(other.verdicts(), [Verdict::New]);
    }

    #[tokio::test]
    async fn a_concurrent_request_waits_for_the_first_and_sees_its_outcome() {
        let dedup = dedup();
        let first = dedup.reserve(&keys(&["a"])).await;
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move { dedup.reserve(&keys(&["b", "a"])).await.verdicts().to_vec() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "must wait while `a` is in flight");
        first.commit();
        assert_eq!(waiter.await.unwrap(), [Verdict::New, Verdict::Duplicate]);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_id_when_the_first_request_fails() {
        let dedup = dedup();
        let first = dedup.reserve(&keys(&["a"])).await;
        let waiter = {
            let dedup = dedup.clone();
            tokio::spawn(async move { dedup.reserve(&keys(&["a"])).await.verdicts().to_vec() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert_eq!(waiter.await.unwrap(), [Verdict::New]);
    }

    #[tokio::test]
    async fn crossing_requests_do_not_deadlock() {
        let dedup = dedup();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let dedup = dedup.clone();
            let order = if i % 2 == 0 { ["x", "y"] } else { ["y", "x"] };
            tasks.push(tokio::spawn(async move {
                let reservation = dedup.reserve(&keys(&order)).await;
                tokio::task::yield_now().await;
                let new = reservation.verdicts().iter().filter(|v| **v == Verdict::New).count();
                reservation.commit();
                new
            }));
        }
        let mut written = 0;
        for task in tasks {
            written += tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(written, 2, "x and y are each written exactly once");
    }

    #[tokio::test]
    async fn the_entry_bound_holds() {
        let dedup = Arc::new(LocalDedup::new(Duration::from_secs(3600), SHARDS * 2));
        for i in 0..10_000 {
            dedup.reserve(&keys(&[&i.to_string()])).await.commit();
        }
        assert!(dedup.len() <= SHARDS * 2, "{} entries", dedup.len());
    }

    #[test]
    fn restored_ids_outside_the_window_are_ignored() {
        let dedup = LocalDedup::new(Duration::from_secs(60), 1000);
        dedup.restore(DedupKey::new("web", "old"), now_unix_seconds() - 120);
        dedup.restore(DedupKey::new("web", "new"), now_unix_seconds() - 10);
        assert_eq!(dedup.len(), 1);
    }
}
