//! The crate's error type.

use std::io;

/// Everything that can go wrong while opening, reading, writing or checking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error of the underlying storage.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The file is not a qcow2 image (wrong magic).
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    /// The image uses a qcow2 version this crate does not know.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// A header field or on-disk structure is invalid; the message names it.
    #[error("Invalid qcow2 image: {0}")]
    Invalid(String),
    /// The image uses incompatible features this crate does not support.
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeature(String),
    /// The image carries the corrupt bit and cannot be opened for writing.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptImage,
    /// An inconsistency was found while running; the image was marked corrupt and is now read-only.
    #[error("qcow2: Marking image as corrupt: {0}; further corruption events will be suppressed")]
    CorruptionDetected(String),
    /// A write was attempted on an image opened read-only (or made read-only by corruption).
    #[error("Image is read-only")]
    ReadOnly,
    /// The request lies (partly) beyond the end of the image.
    #[error("Request out of range: offset {offset} length {len} image size {size}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
    /// A caller-supplied argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The image refers to a backing file or data file that the caller's opener refused or failed to open.
    #[error("Could not open '{name}': {reason}")]
    Open {
        /// The file name as written in the image header.
        name: String,
        /// Why it failed.
        reason: String,
    },
    /// A snapshot with the given id or name does not exist.
    #[error("Can't find snapshot '{0}'")]
    SnapshotNotFound(String),
    /// A bitmap with the given name does not exist.
    #[error("Bitmap '{0}' not found")]
    BitmapNotFound(String),
    /// Compressing or decompressing a cluster failed.
    #[error("Compression error: {0}")]
    Compression(String),
    /// The operation is valid qcow2 but not supported in this configuration.
    #[error("Operation not supported: {0}")]
    NotSupported(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
