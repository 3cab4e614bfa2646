//! QEMU-style character devices for Rust VMMs.
//!
//! - [`ChardevRegistry`]: the chardevs of a VMM by id. It creates backends
//!   from a [`ChardevConfig`] (what `chardev-add` and `-chardev` describe),
//!   removes them (refused while a frontend is attached), attaches
//!   [`Frontend`]s (a serial port, a monitor) and serves the ring-buffer
//!   commands. Its descriptors live on the caller's `mio` poll, in a token
//!   range the caller gives; timers (socket reconnection, pty polling) are
//!   driven by [`ChardevRegistry::next_timeout`] and
//!   [`ChardevRegistry::on_timeout`]. No thread is started.
//! - Backends: `ringbuf` (alias `memory`), `null`, `file`, `socket` (Unix and
//!   TCP, server or client, `wait`, `reconnect`, telnet), `pty`, `stdio`;
//!   the [`Backend`] trait for others.
//! - [`RingBuf`]: the thread-safe overwriting ring (a vCPU thread writes,
//!   the monitor reads).
//! - [`parse_chardev_opts`]: QEMU's `-chardev` syntax.
//! - With the `qmp` feature (default): [`qmp`] implements
//!   `qapi_types::CharCommands` on the registry (`query-chardev`,
//!   `query-chardev-backends`, `ringbuf-write`, `ringbuf-read`,
//!   `chardev-add`, `chardev-remove`) and converts configurations to and from
//!   the QAPI types. Without it the crate has no sibling dependency.
//!
//! ```
//! use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry, DataFormat, Frontend};
//!
//! struct Uart(Vec<u8>);
//! impl Frontend for Uart {
//!     fn can_receive(&mut self) -> usize { 16 - self.0.len() }
//!     fn receive(&mut self, data: &[u8]) { self.0.extend_from_slice(data) }
//! }
//!
//! let mut reg = ChardevRegistry::new();
//! let opts = parse_chardev_opts("ringbuf,id=rb0,size=4096").unwrap();
//! reg.add(&opts.id, &opts.config).unwrap();
//! let serial = reg.attach("rb0", Box::new(Uart(Vec::new()))).unwrap();
//! serial.write(b"guest says hi\n").unwrap(); // from a vCPU thread
//! assert_eq!(reg.ringbuf_read("rb0", 100, DataFormat::Utf8).unwrap(), "guest says hi\n");
//! assert_eq!(reg.remove("rb0").unwrap_err().to_string(), "Chardev 'rb0' is busy");
//! ```

#![deny(missing_docs)]

mod backend;
pub mod base64;
mod config;
mod error;
mod frontend;
mod opts;
#[cfg(feature = "qmp")]
pub mod qmp;
mod registry;
pub mod ring;
pub mod utf8;

pub use backend::{Backend, BackendContext, FdResolver, Sink};
pub use config::{
    BackendConfig, ChardevConfig, RingbufName, SocketAddrConfig, SocketConfig, BACKEND_NAMES,
};
pub use error::ChardevError;
pub use frontend::{ChardevEvent, ChardevEventKind, ChardevWriter, Frontend, FrontendHandle};
pub use opts::{parse_chardev_opts, ParsedChardev};
pub use registry::{AddOutcome, ChardevInfo, ChardevRegistry, DataFormat};
pub use ring::RingBuf;
pub use utf8::Utf8ReadMode;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
