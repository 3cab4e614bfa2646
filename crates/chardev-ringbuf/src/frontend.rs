//! The frontend side: what a device (serial port, monitor) implements to
//! receive input, and the handle it gets to write output.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use crate::backend::Sink;

/// A backend event delivered to the frontend and queued in the registry
/// (QEMU's `CHR_EVENT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChardevEventKind {
    /// The backend is connected: a socket client connected, a pty's slave
    /// side was opened. Frontends such as a monitor start a session here.
    Opened,
    /// The backend lost its connection or its input ended.
    Closed,
    /// A break condition (telnet `IAC BREAK`).
    Break,
}

/// An event of one chardev, as queued by the registry for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevEvent {
    /// The chardev's id.
    pub id: String,
    /// What happened.
    pub kind: ChardevEventKind,
}

/// A device attached to a chardev.
///
/// The registry calls it on the thread that runs the event loop. Input
/// flows with back-pressure: the backend only reads from its source as many
/// bytes as [`can_receive`](Frontend::can_receive) allows, and stops reading
/// when it returns 0, so a frontend is never overrun. When the frontend
/// makes room again (a guest read its receive FIFO), it must call
/// [`FrontendHandle::accept_input`] so reading resumes (QEMU's
/// `qemu_chr_fe_accept_input`).
pub trait Frontend: Send {
    /// How many bytes the frontend can take now.
    fn can_receive(&mut self) -> usize;
    /// Input, at most what `can_receive` allowed just before.
    fn receive(&mut self, data: &[u8]);
    /// A backend event; the default ignores it.
    fn event(&mut self, event: ChardevEventKind) {
        let _ = event;
    }
    /// Output that [`FrontendHandle::write`] refused for lack of room can be
    /// retried now; the default ignores it.
    fn output_ready(&mut self) {}
}

/// The output side of a chardev shared by every writer: the backend's sink
/// and the optional log file.
pub(crate) struct ChardevOut {
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) log: Option<Mutex<File>>,
}

impl ChardevOut {
    pub(crate) fn write(&self, data: &[u8]) -> io::Result<usize> {
        let n = self.sink.write(data)?;
        if let Some(log) = &self.log {
            if n > 0 {
                let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f.write_all(&data[..n]) {
                    log::warn!("chardev log file write failed: {e}");
                }
            }
        }
        Ok(n)
    }
}

/// Requests from frontends (on any thread) that input resume, and the
/// socket that wakes the event loop for them.
pub(crate) struct Kick {
    pub(crate) pending: Mutex<BTreeSet<u64>>,
    pub(crate) waker: Option<std::os::unix::net::UnixStream>,
}

impl Kick {
    pub(crate) fn request(&self, key: u64) {
        let first = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let was_empty = p.is_empty();
            p.insert(key);
            was_empty
        };
        if first {
            if let Some(w) = &self.waker {
                // A full socket already holds a wake-up: nothing to do.
                let _ = (&*w).write(&[1]);
            }
        }
    }

    pub(crate) fn take(&self) -> BTreeSet<u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What a frontend holds after attaching: output to the chardev from any
/// thread, and the input wake-up. Cloneable, `Send` and `Sync`.
#[derive(Clone)]
pub struct FrontendHandle {
    pub(crate) id: Arc<str>,
    pub(crate) key: u64,
    pub(crate) out: Arc<ChardevOut>,
    pub(crate) kick: Arc<Kick>,
}

impl std::fmt::Debug for FrontendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl FrontendHandle {
    /// The chardev's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Writes output without blocking (QEMU's `qemu_chr_fe_write`).
    ///
    /// Returns how many bytes were accepted, possibly fewer than given, or
    /// [`io::ErrorKind::WouldBlock`] when none can be accepted now (a socket
    /// peer that does not read filled its buffer and the chardev's output
    /// queue); [`Frontend::output_ready`] tells when to retry. Backends that
    /// have nowhere to send (a socket with no client, a pty nobody opened)
    /// accept and drop the bytes, as QEMU does, so a guest never stalls on
    /// an unconnected console.
    pub fn write(&self, data: &[u8]) -> io::Result<usize> {
        self.out.write(data)
    }

    /// A `std::io::Write` on this chardev (for example the output of a
    /// `vm-superio` serial port). Its `write` is [`FrontendHandle::write`].
    pub fn writer(&self) -> ChardevWriter {
        ChardevWriter(self.clone())
    }

    /// Tells the registry that the frontend can take input again; safe from
    /// any thread. The event loop then reads from the backend's source.
    pub fn accept_input(&self) {
        self.kick.request(self.key);
    }
}

/// `std::io::Write` over a [`FrontendHandle`].
#[derive(Clone, Debug)]
pub struct ChardevWriter(FrontendHandle);

impl Write for ChardevWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
