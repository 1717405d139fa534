//! The memory message bodies may take while they are received, over all sessions
//! (`smtp.max_inflight_data`). A body is held in memory from its first byte until the queue
//! has it on disk; without a cap, a few clients sending large messages at once could take more
//! than the pod's memory limit, and an OOM kill loses every message not yet acknowledged.
//!
//! The budget is split in two pools, so that no two sessions can wait for each other:
//! - the **small** pool gives each message [`SMALL_GRANT`] (or its declared `SIZE`, when
//!   smaller) at the start of DATA; most mail fits and never asks again;
//! - the **large** pool gives a message that outgrows its small grant (or declares a larger
//!   `SIZE`) a whole `max_message_size` at once: room for any message, so its holder never
//!   waits again. Grants are all-or-nothing, so a waiter holds at most one small grant and
//!   the holders of large grants always finish.
//!
//! While a session waits it does not read: TCP slows its client down. A wait longer than the
//! session's limit refuses the message with `451 4.3.2` (the client retries later).

use std::sync::Arc;

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// What a message gets from the small pool at the start of DATA.
pub const SMALL_GRANT: usize = 256 * 1024;
/// A large grant is `max_message_size` and this: room for the body's last read and its
/// capacity rounding, so a message of the largest size never asks again.
pub const LARGE_SLACK: usize = 128 * 1024;

/// The shared budget.
#[derive(Debug)]
pub struct DataBudget {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    /// `max_message_size` + [`LARGE_SLACK`]: the size of one large grant.
    large_grant: usize,
    total: usize,
}

/// The grant one message holds; given back when dropped.
#[derive(Debug, Default)]
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
    large: bool,
}

impl Held {
    /// Bytes this message may hold in memory.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }
}

impl DataBudget {
    /// A budget of `total` bytes for messages of up to `max_message` bytes (checked by the
    /// configuration: `total ≥ max_message + MIN_SMALL_POOL`). The large pool takes as many
    /// whole `max_message` grants as fit in three quarters of it (at least one).
    pub fn new(total: u64, max_message: u64) -> Self {
        let total = (total as usize).min(Semaphore::MAX_PERMITS);
        let max_message = (max_message as usize + LARGE_SLACK).clamp(1, total);
        let grants = ((total / 4 * 3) / max_message).max(1);
        let large = (grants * max_message).min(total);
        Self {
            small: Arc::new(Semaphore::new(total - large)),
            large: Arc::new(Semaphore::new(large)),
            large_grant: max_message,
            total,
        }
    }

    /// Bytes granted to messages in transit now.
    pub fn in_use(&self) -> usize {
        self.total - self.small.available_permits() - self.large.available_permits()
    }

    /// Makes `held` cover `bytes`, waiting until `deadline`; false when no grant came in time
    /// (what it held before stays).
    pub async fn grow(&self, held: &mut Held, bytes: usize, deadline: Instant) -> bool {
        if bytes <= held.bytes() {
            return true;
        }
        let (pool, want, large) = if bytes <= SMALL_GRANT && held.permit.is_none() {
            (&self.small, SMALL_GRANT.max(bytes), false)
        } else if held.large {
            return false; // a large grant is the most any message gets
        } else {
            (&self.large, self.large_grant, true)
        };
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        let acquire = pool.clone().acquire_many_owned(want);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(p)) => {
                // a large grant replaces the small one, which goes back at once
                held.permit = Some(p);
                held.large = large;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn small_messages_share_the_small_pool_and_large_ones_take_turns() {
        // 10 MiB for messages of up to 2 MiB: three large grants (2 MiB + slack each, within
        // three quarters), the rest (3.625 MiB: 14 small grants) small
        let b = Arc::new(DataBudget::new(10 << 20, 2 << 20));
        let now = Instant::now;
        let mut smalls: Vec<Held> = (0..14).map(|_| Held::default()).collect();
        for h in smalls.iter_mut() {
            assert!(b.grow(h, 1000, now()).await, "14 x 256 KiB fit");
            assert_eq!(h.bytes(), SMALL_GRANT);
        }
        let mut ninth = Held::default();
        assert!(
            !b.grow(&mut ninth, 1000, now() + Duration::from_secs(1))
                .await
        );
        // growing past the small grant: a whole large grant, the small one given back
        let mut big: Vec<Held> = Vec::new();
        for mut h in smalls.drain(..3) {
            assert!(b.grow(&mut h, 300 * 1024, now()).await);
            assert_eq!(h.bytes(), (2 << 20) + LARGE_SLACK);
            big.push(h);
        }
        assert!(
            b.grow(&mut ninth, 1000, now()).await,
            "small grants came back"
        );
        let mut fourth = smalls.pop().unwrap();
        assert!(
            !b.grow(&mut fourth, 300 * 1024, now() + Duration::from_secs(1))
                .await,
            "three large grants at once, no more"
        );
        assert_eq!(
            fourth.bytes(),
            SMALL_GRANT,
            "kept its small grant meanwhile"
        );
        assert!(
            !b.grow(&mut big[0], (2 << 20) + LARGE_SLACK + 1, now())
                .await,
            "no more than one grant"
        );
        // a large message is queued: the next one gets its grant
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let ok = b2
                .grow(
                    &mut fourth,
                    300 * 1024,
                    Instant::now() + Duration::from_secs(60),
                )
                .await;
            (ok, fourth.bytes())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        big.pop();
        assert_eq!(waiter.await.unwrap(), (true, (2 << 20) + LARGE_SLACK));
    }
}
