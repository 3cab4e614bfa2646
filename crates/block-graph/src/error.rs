//! The crate's error type.

use std::io;

use qmp_proto::{ErrorClass, QmpError};

/// Everything that can go wrong in the block layer: failed requests (with an errno, as guest
/// devices and `BLOCK_IO_ERROR` need it) and refused management operations (with a message in
/// QEMU's words, as QMP clients see it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// A request failed with `errno`; `msg` says why (QEMU's `strerror` text by default).
    #[error("{msg}")]
    Io {
        /// The POSIX error number (`EIO`, `ENOSPC`, ...).
        errno: i32,
        /// A human-readable description.
        msg: String,
    },
    /// A management operation was refused; the message is what QMP shows.
    #[error("{0}")]
    Generic(String),
    /// A device, node or bitmap named by the caller does not exist (QMP class
    /// `DeviceNotFound`).
    #[error("{0}")]
    DeviceNotFound(String),
    /// Two users of a node want incompatible permissions.
    #[error("{0}")]
    PermissionConflict(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, BlockError>;

/// The text of an errno, as C's `strerror` gives it ("Input/output error").
pub fn strerror(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl BlockError {
    /// A failed request with `errno` and its standard text.
    pub fn errno(errno: i32) -> Self {
        BlockError::Io {
            errno,
            msg: strerror(errno),
        }
    }

    /// A failed request with `errno` and a custom message.
    pub fn io(errno: i32, msg: impl Into<String>) -> Self {
        BlockError::Io {
            errno,
            msg: msg.into(),
        }
    }

    /// A refused management operation.
    pub fn generic(msg: impl Into<String>) -> Self {
        BlockError::Generic(msg.into())
    }

    /// Something named does not exist.
    pub fn not_found(msg: impl Into<String>) -> Self {
        BlockError::DeviceNotFound(msg.into())
    }

    /// The errno that best describes the failure (for guest devices and error policies).
    pub fn errno_value(&self) -> i32 {
        match self {
            BlockError::Io { errno, .. } => *errno,
            BlockError::Generic(_) => libc::EINVAL,
            BlockError::DeviceNotFound(_) => libc::ENOENT,
            BlockError::PermissionConflict(_) => libc::EPERM,
        }
    }

    /// Prefixes the message with `prefix: ` (QEMU's `error_prepend`).
    pub fn prepend(self, prefix: &str) -> Self {
        match self {
            BlockError::Io { errno, msg } => BlockError::Io {
                errno,
                msg: format!("{prefix}: {msg}"),
            },
            BlockError::Generic(m) => BlockError::Generic(format!("{prefix}: {m}")),
            BlockError::DeviceNotFound(m) => BlockError::DeviceNotFound(format!("{prefix}: {m}")),
            BlockError::PermissionConflict(m) => {
                BlockError::PermissionConflict(format!("{prefix}: {m}"))
            }
        }
    }
}

impl From<io::Error> for BlockError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => BlockError::errno(n),
            None => BlockError::io(libc::EIO, e.to_string()),
        }
    }
}

impl From<BlockError> for io::Error {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Io { errno, msg } => {
                if msg == strerror(errno) {
                    io::Error::from_raw_os_error(errno)
                } else {
                    io::Error::new(io::Error::from_raw_os_error(errno).kind(), msg)
                }
            }
            other => io::Error::other(other.to_string()),
        }
    }
}

impl From<qcow2::Error> for BlockError {
    fn from(e: qcow2::Error) -> Self {
        use qcow2::Error as E;
        match e {
            E::Io(io) => io.into(),
            E::ReadOnly => BlockError::io(libc::EACCES, "Image is read-only"),
            E::OutOfRange { .. } => BlockError::io(libc::EIO, e.to_string()),
            E::CorruptionDetected(_) => BlockError::io(libc::EIO, e.to_string()),
            E::NotSupported(m) => BlockError::io(libc::ENOTSUP, m),
            E::SnapshotNotFound(_) | E::BitmapNotFound(_) => BlockError::Generic(e.to_string()),
            E::InvalidArgument(m) => BlockError::Generic(m),
            other => BlockError::Generic(other.to_string()),
        }
    }
}

impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::DeviceNotFound(m) => QmpError::new(ErrorClass::DeviceNotFound, m),
            other => QmpError::generic(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_matches_strerror() {
        assert_eq!(strerror(libc::EIO), "Input/output error");
        assert_eq!(
            BlockError::errno(libc::ENOSPC).to_string(),
            "No space left on device"
        );
        let io: io::Error = BlockError::errno(libc::EIO).into();
        assert_eq!(io.raw_os_error(), Some(libc::EIO));
        let back: BlockError = io.into();
        assert_eq!(back.errno_value(), libc::EIO);
    }

    #[test]
    fn qmp_classes() {
        let q: QmpError = BlockError::not_found("Device 'x' not found").into();
        assert_eq!(q.class, ErrorClass::DeviceNotFound);
        let q: QmpError = BlockError::generic("nope").into();
        assert_eq!(q.class, ErrorClass::GenericError);
        assert_eq!(
            BlockError::errno(libc::EIO)
                .prepend("Could not open 'x'")
                .to_string(),
            "Could not open 'x': Input/output error"
        );
    }
}
