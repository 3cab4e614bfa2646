//! The `stdio` backend: input from the process's standard input, output to
//! its standard output, the terminal put in the mode QEMU sets.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mio::event::Event;
use mio::Token;

use super::{sys, Backend, BackendContext, FileSink, Input, PumpEnd, Sink};
use crate::error::strerror;
use crate::frontend::ChardevEventKind;

/// Only one stdio chardev may exist in a process (QEMU's rule).
static STDIO_IN_USE: AtomicBool = AtomicBool::new(false);

/// The stdio backend.
pub(crate) struct StdioBackend {
    sink: Arc<FileSink>,
    input: Input,
    /// The terminal mode to restore, if the input is a terminal.
    saved: Option<libc::termios>,
    /// Whether this backend holds the process-wide stdio slot.
    holds_slot: bool,
}

impl StdioBackend {
    /// Opens the process's stdin and stdout.
    pub(crate) fn open(cx: &mut BackendContext<'_>, signal: bool) -> Result<Self, String> {
        if !cx.has_poll() {
            return Err("a stdio chardev needs an event loop".into());
        }
        if STDIO_IN_USE.swap(true, Ordering::SeqCst) {
            return Err("cannot use stdio by multiple character devices".into());
        }
        let fds = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .and_then(|i| Ok((i, std::io::stdout().as_fd().try_clone_to_owned()?)));
        let result = match fds {
            Ok((i, o)) => Self::open_fds(cx, i, o, signal),
            Err(e) => Err(format!("cannot use stdio: {}", strerror(&e))),
        };
        match result {
            Ok(mut b) => {
                b.holds_slot = true;
                Ok(b)
            }
            Err(e) => {
                STDIO_IN_USE.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// The backend over given descriptors (the input is treated as shared:
    /// never made non-blocking).
    pub(crate) fn open_fds(
        cx: &mut BackendContext<'_>,
        input: OwnedFd,
        output: OwnedFd,
        signal: bool,
    ) -> Result<Self, String> {
        let fd = input.as_raw_fd();
        let saved = if sys::isatty(fd) {
            let old = sys::get_termios(fd).map_err(|e| strerror(&e))?;
            sys::set_termios(fd, &sys::stdio_termios(&old, signal)).map_err(|e| strerror(&e))?;
            Some(old)
        } else {
            None
        };
        let input = match Input::new(cx, input, true) {
            Ok(i) => i,
            Err(e) => {
                if let Some(old) = &saved {
                    let _ = sys::set_termios(fd, old);
                }
                return Err(format!("cannot poll standard input: {}", strerror(&e)));
            }
        };
        Ok(StdioBackend {
            sink: Arc::new(FileSink(Mutex::new(File::from(output)))),
            input,
            saved,
            holds_slot: false,
        })
    }

    fn restore(&mut self) {
        if let Some(old) = self.saved.take() {
            if let Err(e) = sys::set_termios(self.input.file.as_raw_fd(), &old) {
                log::warn!("restoring the terminal mode: {e}");
            }
        }
    }
}

impl Drop for StdioBackend {
    fn drop(&mut self) {
        self.restore();
        if self.holds_slot {
            STDIO_IN_USE.store(false, Ordering::SeqCst);
        }
    }
}

impl Backend for StdioBackend {
    fn filename(&self) -> String {
        "stdio".into()
    }
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }
    fn is_open(&self) -> bool {
        true
    }
    fn handle_event(&mut self, cx: &mut BackendContext<'_>, token: Token, event: &Event) {
        if self.input.token == Some(token) && !self.input.eof {
            let hup = event.is_read_closed() || event.is_error();
            if self.input.pump(cx, hup) == PumpEnd::Eof {
                self.input.close(cx);
                cx.event(ChardevEventKind::Closed);
            }
        }
    }
    fn pump(&mut self, cx: &mut BackendContext<'_>) {
        if !self.input.eof && self.input.pump(cx, false) == PumpEnd::Eof {
            self.input.close(cx);
            cx.event(ChardevEventKind::Closed);
        }
    }
    fn shutdown(&mut self, cx: &mut BackendContext<'_>) {
        self.input.close(cx);
        self.restore();
    }
}
