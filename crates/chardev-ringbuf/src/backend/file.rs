//! The `file` backend: output to a file (truncated or appended), input
//! from an optional second file.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use mio::event::Event;
use mio::Token;

use super::{Backend, BackendContext, FileSink, Input, PumpEnd, Sink};
use crate::error::strerror;
use crate::frontend::ChardevEventKind;

/// The file backend.
pub(crate) struct FileBackend {
    sink: Arc<FileSink>,
    input: Option<Input>,
}

/// Opens `path` as QEMU does for chardev files, with its error message.
pub(crate) fn open_out(path: &str, append: bool, verb: &str) -> Result<File, String> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(0o666);
    if append {
        o.append(true);
    } else {
        o.truncate(true);
    }
    o.open(path)
        .map_err(|e| format!("Could not {verb} '{path}': {}", strerror(&e)))
}

impl FileBackend {
    pub(crate) fn open(
        cx: &mut BackendContext<'_>,
        out: &str,
        input: Option<&str>,
        append: bool,
    ) -> Result<Self, String> {
        let out = open_out(out, append, "open")?;
        let input = match input {
            None => None,
            Some(path) => {
                let f = File::open(path)
                    .map_err(|e| format!("Could not open '{path}': {}", strerror(&e)))?;
                if !cx.has_poll() {
                    return Err("a file chardev with input needs an event loop".into());
                }
                Some(
                    Input::new(cx, OwnedFd::from(f), false)
                        .map_err(|e| format!("Could not poll '{path}': {}", strerror(&e)))?,
                )
            }
        };
        Ok(FileBackend {
            sink: Arc::new(FileSink(Mutex::new(out))),
            input,
        })
    }
}

impl Backend for FileBackend {
    fn filename(&self) -> String {
        "file".into()
    }
    fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }
    fn is_open(&self) -> bool {
        true
    }
    fn handle_event(&mut self, cx: &mut BackendContext<'_>, token: Token, event: &Event) {
        if let Some(input) = self.input.as_mut() {
            if input.token == Some(token) && !input.eof {
                let hup = event.is_read_closed() || event.is_error();
                if input.pump(cx, hup) == PumpEnd::Eof {
                    input.close(cx);
                    cx.event(ChardevEventKind::Closed);
                }
            }
        }
    }
    fn pump(&mut self, cx: &mut BackendContext<'_>) {
        if let Some(input) = self.input.as_mut() {
            if !input.eof && input.pump(cx, false) == PumpEnd::Eof {
                input.close(cx);
                cx.event(ChardevEventKind::Closed);
            }
        }
    }
    fn shutdown(&mut self, cx: &mut BackendContext<'_>) {
        if let Some(input) = self.input.as_mut() {
            input.close(cx);
        }
    }
}

/// Keeps `fd` referenced in debug output without exposing it.
impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("input_fd", &self.input.as_ref().map(|i| i.file.as_raw_fd()))
            .finish()
    }
}
