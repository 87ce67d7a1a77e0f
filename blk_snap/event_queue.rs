// SPDX-License-Identifier: GPL-2.0

//! Snapshot events: what user space learns with
//! `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`.
//!
//! Events are queued in order and each is delivered to one waiter. When the
//! snapshot is destroyed the queue closes and its waiters wake with `ESRCH`.
//!
//! Upstream clients know only the upstream codes, corrupted (0) and no_space
//! (1), and treat any other code as an error: our extension codes (64 and
//! up) reach only the snapshots created through our extension ioctl.

use crate::uapi;
use kernel::{
    alloc::{flags::GFP_ATOMIC, KVec},
    error::code::*,
    new_condvar, new_spinlock,
    prelude::*,
    sync::{Arc, CondVar, SpinLock},
    time::{msecs_to_jiffies, Ktime},
};

/// Largest event payload we produce.
pub(crate) const PAYLOAD: usize = 16;

/// One event.
#[derive(Clone, Copy)]
pub(crate) struct Event {
    /// `enum blksnap_event_codes`, or our extension codes.
    pub(crate) code: u32,
    /// When it happened, in nanoseconds of `ktime_get()`.
    pub(crate) time_ns: i64,
    /// The payload, as its C structure's bytes.
    pub(crate) data: [u8; PAYLOAD],
}

struct Queue {
    events: KVec<Event>,
    closed: bool,
}

/// The event queue of a snapshot.
#[pin_data]
pub(crate) struct EventQueue {
    #[pin]
    queue: SpinLock<Queue>,
    #[pin]
    ready: CondVar,
    /// The snapshot was created through our extension ioctl: its clients
    /// know our extension events.
    extensions: bool,
}

impl EventQueue {
    /// Creates an empty queue; `extensions` lets our extension events in.
    pub(crate) fn new(extensions: bool) -> Result<Arc<Self>> {
        Arc::pin_init(
            try_pin_init!(Self {
                queue <- new_spinlock!(Queue { events: KVec::new(), closed: false }, "EventQueue::queue"),
                ready <- new_condvar!("EventQueue::ready"),
                extensions,
            }),
            kernel::alloc::flags::GFP_KERNEL,
        )
    }

    /// True if the snapshot's clients know our extension events.
    pub(crate) fn extensions(&self) -> bool {
        self.extensions
    }

    /// Queues an event; `data` is its payload. May be called from any
    /// context. An extension event is dropped for a snapshot created
    /// through the upstream interface.
    pub(crate) fn push(&self, code: u32, data: &[u8]) {
        if code != uapi::event::CORRUPTED && code != uapi::event::NO_SPACE && !self.extensions {
            return;
        }
        let mut event = Event {
            code,
            time_ns: Ktime::ktime_get().to_ns(),
            data: [0; PAYLOAD],
        };
        let n = data.len().min(PAYLOAD);
        event.data[..n].copy_from_slice(&data[..n]);
        {
            let mut q = self.queue.lock();
            if q.closed {
                return;
            }
            if q.events.push(event, GFP_ATOMIC).is_err() {
                drop(q);
                pr_err!("event {} lost: out of memory\n", code);
                return;
            }
        }
        self.ready.notify_one();
    }

    /// Waits up to `timeout_ms` for the next event and takes it. As
    /// upstream: `ENOENT` if none came in time, `EINTR` if a signal came
    /// first (never restarted: the caller decides whether to wait again).
    pub(crate) fn wait(&self, timeout_ms: u32) -> Result<Event> {
        let mut left = msecs_to_jiffies(timeout_ms);
        let mut q = self.queue.lock();
        loop {
            if q.closed {
                return Err(ESRCH);
            }
            if let Some(e) = q.events.remove(0) {
                return Ok(e);
            }
            if left == 0 {
                return Err(ENOENT);
            }
            match self.ready.wait_interruptible_timeout(&mut q, left) {
                kernel::sync::CondVarTimeoutResult::Timeout => left = 0,
                kernel::sync::CondVarTimeoutResult::Woken { jiffies } => left = jiffies,
                kernel::sync::CondVarTimeoutResult::Signal { .. } => return Err(EINTR),
            }
        }
    }

    /// Closes the queue: pending and future waits fail with `ESRCH`.
    pub(crate) fn close(&self) {
        self.queue.lock().closed = true;
        self.ready.notify_all();
    }
}
