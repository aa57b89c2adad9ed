//! Admission control: a bounded number of running generations, a bounded
//! wait queue, and a free-memory floor. Rejection beats queueing forever:
//! clients (the Anthropic and OpenAI SDKs, Claude Code) retry 529s on their
//! own, honouring `retry-after`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::memory::MemoryMonitor;

pub struct Admission {
    slots: Arc<Semaphore>,
    max_slots: usize,
    /// Requests parked in `acquire` waiting for a slot.
    waiting: AtomicUsize,
    max_queue: usize,
    min_free_memory: u64,
    pub memory: MemoryMonitor,
}

/// Decrements the queue counter however the wait ends (slot, or the client
/// going away and the future being dropped).
struct QueueSeat<'a>(&'a AtomicUsize);

impl Drop for QueueSeat<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max_concurrent: u32, max_queue: u32, min_free_memory: u64) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrent as usize)),
            max_slots: max_concurrent as usize,
            waiting: AtomicUsize::new(0),
            max_queue: max_queue as usize,
            min_free_memory,
            memory: MemoryMonitor::default(),
        }
    }

    /// Slots currently held by running requests.
    pub fn in_use(&self) -> usize {
        self.max_slots - self.slots.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.max_slots
    }

    fn check_memory(&self) -> Result<(), ApiError> {
        if self.min_free_memory == 0 {
            return Ok(());
        }
        let free = self.memory.available();
        if free < self.min_free_memory {
            crate::metrics::rejected("memory");
            return Err(ApiError::Overloaded {
                message: format!(
                    "memory is low: {} MiB available, below the {} MiB floor (--min-free-memory); try again shortly",
                    free >> 20,
                    self.min_free_memory >> 20
                ),
                retry_after_secs: 5,
            });
        }
        Ok(())
    }

    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.check_memory()?;
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _seat = QueueSeat(&self.waiting);
        if before >= self.max_queue {
            crate::metrics::rejected("capacity");
            return Err(ApiError::Overloaded {
                message: format!(
                    "server is at capacity: {} requests running and {} queued; retry shortly",
                    self.max_slots, self.max_queue
                ),
                retry_after_secs: 1,
            });
        }
        self.slots.clone().acquire_owned().await.map_err(|_| ApiError::Unavailable("the server is shutting down".into()))
    }

    /// Stops admitting: waiting and future acquires fail.
    pub fn close(&self) {
        self.slots.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_slots_and_queue_reject_with_529() {
        let a = Arc::new(Admission::new(1, 1, 0));
        let p1 = a.acquire().await.unwrap();
        assert_eq!(a.in_use(), 1);
        // One may wait...
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|_| ()) });
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // ...the next is refused.
        let err = a.acquire().await.unwrap_err();
        assert_eq!(err.status().as_u16(), 529);
        assert!(err.retry_after().is_some());
        drop(p1);
        waiter.await.unwrap().unwrap();
        assert_eq!(a.queued(), 0);
        assert_eq!(a.in_use(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_the_queue() {
        let a = Arc::new(Admission::new(1, 4, 0));
        let _p = a.acquire().await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.acquire().await.map(|_| ()) });
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.queued(), 0);
    }

    #[tokio::test]
    async fn low_memory_is_refused() {
        let a = Admission::new(4, 4, u64::MAX);
        let err = a.acquire().await.unwrap_err();
        assert_eq!(err.status().as_u16(), 529);
        assert!(err.message().contains("memory is low"), "{}", err.message());
    }
}
