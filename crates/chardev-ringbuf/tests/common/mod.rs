//! Helpers shared by the integration tests: a recording frontend and a
//! driver for the registry on a real mio poll.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chardev_ringbuf::{ChardevEventKind, ChardevRegistry, Frontend};
use mio::{Events, Poll};

/// What a [`TestFrontend`] saw.
#[derive(Default)]
pub struct Seen {
    /// Input not yet consumed by the test.
    pub data: Vec<u8>,
    /// Everything ever received.
    pub total: Vec<u8>,
    /// Room the frontend has (bytes of unconsumed input it holds at most).
    pub cap: usize,
    /// Events, in order.
    pub events: Vec<ChardevEventKind>,
    /// Calls of `output_ready`.
    pub output_ready: usize,
    /// Largest single delivery.
    pub max_chunk: usize,
}

/// A frontend with a bounded receive buffer, like a UART FIFO.
pub struct TestFrontend(pub Arc<Mutex<Seen>>);

impl TestFrontend {
    pub fn boxed(cap: usize) -> (Box<dyn Frontend>, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen {
            cap,
            ..Default::default()
        }));
        (Box::new(TestFrontend(seen.clone())), seen)
    }
}

impl Frontend for TestFrontend {
    fn can_receive(&mut self) -> usize {
        let s = self.0.lock().unwrap();
        s.cap.saturating_sub(s.data.len())
    }
    fn receive(&mut self, data: &[u8]) {
        let mut s = self.0.lock().unwrap();
        assert!(
            s.data.len() + data.len() <= s.cap,
            "frontend overrun: {} + {} > {}",
            s.data.len(),
            data.len(),
            s.cap
        );
        s.data.extend_from_slice(data);
        s.total.extend_from_slice(data);
        s.max_chunk = s.max_chunk.max(data.len());
    }
    fn event(&mut self, event: ChardevEventKind) {
        self.0.lock().unwrap().events.push(event);
    }
    fn output_ready(&mut self) {
        self.0.lock().unwrap().output_ready += 1;
    }
}

/// A registry on a fresh poll with tokens 100..200.
pub fn registry() -> (Poll, ChardevRegistry) {
    let poll = Poll::new().unwrap();
    let reg = ChardevRegistry::with_poll(poll.registry(), 100..200).unwrap();
    (poll, reg)
}

/// Runs the event loop until `done` holds or `timeout` passes; returns
/// whether `done` held.
pub fn run_until(
    poll: &mut Poll,
    reg: &mut ChardevRegistry,
    timeout: Duration,
    mut done: impl FnMut(&mut ChardevRegistry) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut events = Events::with_capacity(64);
    loop {
        if done(reg) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let mut t = (deadline - now).min(Duration::from_millis(20));
        if let Some(d) = reg.poll_timeout(now) {
            t = t.min(d);
        }
        poll.poll(&mut events, Some(t)).unwrap();
        for e in events.iter() {
            assert!(reg.owns(e.token()), "foreign token {:?}", e.token());
            reg.handle_event(e);
        }
        reg.on_timeout(Instant::now());
    }
}

/// Runs the loop for a while (to show that something does NOT happen).
pub fn run_for(poll: &mut Poll, reg: &mut ChardevRegistry, d: Duration) {
    run_until(poll, reg, d, |_| false);
}

/// Collects notices in a shared list.
pub fn capture_notices(reg: &mut ChardevRegistry) -> Arc<Mutex<Vec<String>>> {
    let notes = Arc::new(Mutex::new(Vec::new()));
    let n = notes.clone();
    reg.set_notice(move |m| n.lock().unwrap().push(m.to_owned()));
    notes
}

/// The events queued since the last call, as (id, kind).
pub fn drain(reg: &mut ChardevRegistry) -> Vec<(String, ChardevEventKind)> {
    reg.drain_events().map(|e| (e.id, e.kind)).collect()
}

/// The `filename` query-chardev shows for `id`.
pub fn filename(reg: &ChardevRegistry, id: &str) -> String {
    reg.info()
        .into_iter()
        .find(|i| i.label == id)
        .map(|i| i.filename)
        .unwrap_or_default()
}
