//! The queue of QMP events the block layer raises (`BLOCK_IO_ERROR`,
//! `BLOCK_WRITE_THRESHOLD`, `DEVICE_TRAY_MOVED`, `BLOCK_IMAGE_CORRUPTED`, ...). Events may be
//! raised on any thread (an I/O thread that hits an error); the VMM takes them with
//! [`crate::BlockGraph::take_events`] and sends them to its monitors, optionally woken by the
//! notifier set with [`crate::BlockGraph::set_event_notifier`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use qmp_proto::EventMessage;

/// Events kept when nobody takes them; older ones are dropped beyond this.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// A function called after an event was queued (for example one that writes an eventfd).
pub type EventNotifier = Arc<dyn Fn() + Send + Sync>;

/// A thread-safe queue of events.
#[derive(Default)]
pub struct EventQueue {
    q: Mutex<VecDeque<EventMessage>>,
    notifier: Mutex<Option<EventNotifier>>,
}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue").finish_non_exhaustive()
    }
}

impl EventQueue {
    /// Queues an event and wakes the notifier.
    pub fn push(&self, ev: EventMessage) {
        {
            let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_QUEUED_EVENTS {
                log::warn!("block event queue full, dropping {}", q[0].event);
                q.pop_front();
            }
            q.push_back(ev);
        }
        let n = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(n) = n {
            n();
        }
    }

    /// Takes every queued event, oldest first.
    pub fn take(&self) -> Vec<EventMessage> {
        self.q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    /// Sets (or clears) the notifier.
    pub fn set_notifier(&self, n: Option<EventNotifier>) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn queue_notifies_and_bounds() {
        let q = EventQueue::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        q.set_notifier(Some(Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })));
        for i in 0..MAX_QUEUED_EVENTS + 2 {
            q.push(EventMessage::new(format!("E{i}"), None));
        }
        assert_eq!(hits.load(Ordering::SeqCst), MAX_QUEUED_EVENTS + 2);
        let all = q.take();
        assert_eq!(all.len(), MAX_QUEUED_EVENTS);
        assert_eq!(all[0].event, "E2");
        assert!(q.take().is_empty());
    }
}
