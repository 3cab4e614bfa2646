//! The backends without descriptors: `ringbuf`/`memory` and `null`.

use std::io;
use std::sync::Arc;

use mio::event::Event;
use mio::Token;

use super::{Backend, BackendContext, Sink};
use crate::config::RingbufName;
use crate::ring::RingBuf;

struct RingSink(Arc<RingBuf>);

impl Sink for RingSink {
    fn write(&self, data: &[u8]) -> io::Result<usize> {
        Ok(self.0.write(data))
    }
}

/// The ring-buffer backend: frontend output goes into the ring, which the
/// monitor reads with `ringbuf-read`; it has no input.
pub(crate) struct RingbufBackend {
    ring: Arc<RingBuf>,
    name: RingbufName,
}

impl RingbufBackend {
    pub(crate) fn new(ring: RingBuf, name: RingbufName) -> Self {
        RingbufBackend {
            ring: Arc::new(ring),
            name,
        }
    }
}

impl Backend for RingbufBackend {
    fn filename(&self) -> String {
        match self.name {
            RingbufName::Ringbuf => "ringbuf".into(),
            RingbufName::Memory => "memory".into(),
        }
    }
    fn sink(&self) -> Arc<dyn Sink> {
        Arc::new(RingSink(self.ring.clone()))
    }
    fn is_open(&self) -> bool {
        true
    }
    fn ring(&self) -> Option<&Arc<RingBuf>> {
        Some(&self.ring)
    }
    fn handle_event(&mut self, _cx: &mut BackendContext<'_>, _token: Token, _event: &Event) {}
    fn pump(&mut self, _cx: &mut BackendContext<'_>) {}
    fn shutdown(&mut self, _cx: &mut BackendContext<'_>) {}
}

struct NullSink;

impl Sink for NullSink {
    fn write(&self, data: &[u8]) -> io::Result<usize> {
        Ok(data.len())
    }
}

/// The null backend: output is discarded, there is never input.
pub(crate) struct NullBackend;

impl Backend for NullBackend {
    fn filename(&self) -> String {
        "null".into()
    }
    fn sink(&self) -> Arc<dyn Sink> {
        Arc::new(NullSink)
    }
    fn is_open(&self) -> bool {
        true
    }
    fn handle_event(&mut self, _cx: &mut BackendContext<'_>, _token: Token, _event: &Event) {}
    fn pump(&mut self, _cx: &mut BackendContext<'_>) {}
    fn shutdown(&mut self, _cx: &mut BackendContext<'_>) {}
}
