//! How current a relay's snapshot of the store is: when the store last answered, the revision
//! applied, and whether the relay should call its snapshot stale.
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Shared between the task that follows the store and everything that reports on it.
#[derive(Debug)]
pub struct StoreHealth {
    origin: Instant,
    /// Milliseconds after `origin` of the last answer from the store.
    last_contact_ms: AtomicU64,
    /// Milliseconds after `origin` when contact was lost; 0 while in contact.
    lost_at_ms: AtomicU64,
    stale_after: Duration,
    /// The last store revision applied to the snapshot (etcd); 0 for the file store.
    applied: watch::Sender<i64>,
    /// Changes the relay applied from the store since start.
    changes: AtomicU64,
    /// Full reloads (start, and etcd resyncs after a compaction).
    resyncs: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    /// Revision etcd reported last (may be ahead of `applied` for a moment).
    seen: AtomicI64,
}

impl StoreHealth {
    /// In contact as of now; stale after `stale_after` without word.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            origin: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            lost_at_ms: AtomicU64::new(0),
            stale_after,
            applied: watch::Sender::new(0),
            changes: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            seen: AtomicI64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The store answered: the snapshot is current as of now (revision `revision` when known).
    pub fn heard(&self, revision: Option<i64>) {
        self.last_contact_ms.store(self.now_ms(), Ordering::Release);
        if let Some(revision) = revision {
            self.seen.fetch_max(revision, Ordering::AcqRel);
        }
        if self.lost_at_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("store: in contact again");
        }
    }

    /// Contact was lost for `why` (logged once per outage).
    pub fn lost(&self, why: &str) {
        if self
            .lost_at_ms
            .compare_exchange(0, self.now_ms().max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(error = why, "store: lost contact; routing from the last snapshot");
        }
        *self.last_error.lock().expect("health lock") = Some(why.to_owned());
    }

    /// Time since the store last answered: how old the snapshot may be.
    pub fn age(&self) -> Duration {
        let last = self.last_contact_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Whether the snapshot is stale: no answer for longer than `stale_after`.
    pub fn is_stale(&self) -> bool {
        self.age() > self.stale_after
    }

    /// What the store last failed with, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("health lock").clone()
    }

    /// Records that the snapshot now holds everything up to `revision`.
    pub fn applied(&self, revision: i64, changes: u64) {
        self.changes.fetch_add(changes, Ordering::Relaxed);
        self.applied.send_if_modified(|current| {
            let newer = revision > *current;
            if newer {
                *current = revision;
            }
            newer
        });
    }

    /// Records a full reload of the snapshot at `revision`.
    pub fn resynced(&self, revision: i64) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        self.applied(revision, 0);
    }

    /// The revision the snapshot holds (0 for the file store).
    pub fn revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Changes applied since start.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Full reloads since start.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Waits until the snapshot holds `revision` (a write this relay made), at most `limit`;
    /// false if it did not get there in time.
    pub async fn wait_applied(&self, revision: i64, limit: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|applied| *applied >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
