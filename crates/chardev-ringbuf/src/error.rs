//! The crate's error type. Messages are QEMU 7.2's words wherever QEMU has
//! an equivalent error, so they can be passed to a QMP client unchanged.

use std::io;

/// Every error of the crate.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// `chardev-add` or `-chardev` with an id that is already registered.
    #[error("Chardev with id '{0}' already exists")]
    Duplicate(String),
    /// No chardev with this id (chardev-remove, attaching a frontend).
    #[error("Chardev '{0}' not found")]
    NotFound(String),
    /// No chardev with this name (ringbuf-write, ringbuf-read).
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// ringbuf-write or ringbuf-read on a chardev that is not a ring buffer.
    #[error("{0} is not a ringbuf device")]
    NotRingbuf(String),
    /// chardev-remove while a frontend is attached.
    #[error("Chardev '{0}' is busy")]
    Busy(String),
    /// Attaching a second frontend.
    #[error("Device '{0}' is in use")]
    InUse(String),
    /// ringbuf-read with a size of zero or less.
    #[error("size must be greater than zero")]
    ReadSize,
    /// ringbuf-write with invalid base64 data.
    #[error(transparent)]
    Base64(#[from] crate::base64::Base64Error),
    /// A backend could not be created; `reason` says why in QEMU's words.
    #[error("Failed to add chardev '{id}': {reason}")]
    Open {
        /// The chardev's id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// An invalid `-chardev` option string or backend configuration.
    #[error("{0}")]
    Invalid(String),
    /// An I/O error of the event loop itself (registering, waking).
    #[error("{context}: {source}")]
    Io {
        /// What the registry was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ChardevError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ChardevError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The text of an OS error as C's `strerror` gives it (what QEMU prints),
/// without Rust's ` (os error N)` suffix.
pub(crate) fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match e.raw_os_error() {
        Some(code) => s
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&s)
            .to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_rust_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
        let e = io::Error::other("custom");
        assert_eq!(strerror(&e), "custom");
    }

    #[test]
    fn messages_are_qemus() {
        assert_eq!(
            ChardevError::Busy("m".into()).to_string(),
            "Chardev 'm' is busy"
        );
        assert_eq!(
            ChardevError::NotRingbuf("m".into()).to_string(),
            "m is not a ringbuf device"
        );
        assert_eq!(
            ChardevError::Open {
                id: "r3".into(),
                reason: "size of ringbuf chardev must be power of two".into()
            }
            .to_string(),
            "Failed to add chardev 'r3': size of ringbuf chardev must be power of two"
        );
    }
}
