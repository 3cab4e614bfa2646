//! The ring buffer behind the `ringbuf` (alias `memory`) backend.
//!
//! Semantics are QEMU's: the size is a power of two; a write always succeeds
//! and, when the buffer is full, overwrites the oldest bytes (the
//! *overwrite rule*); a read returns the oldest bytes still held, at most as
//! many as asked.
//!
//! The buffer is `Sync`: a vCPU thread writes guest output while the monitor
//! reads it. Every operation holds one mutex for the duration of at most two
//! `memcpy`s, so a reader never sees a torn write, and every byte written is
//! returned by exactly one read unless the overwrite rule dropped it (which
//! [`RingBuf::overwritten`] counts). [`RingBuf::read_at`] returns the stream
//! offset of what it read, so a reader can tell exactly which bytes it lost.

use std::sync::{Mutex, MutexGuard};

/// QEMU's default ring size (64 KiB).
pub const DEFAULT_RING_SIZE: usize = 65536;

/// The largest ring this crate allocates (1 GiB). QEMU has no limit; a size
/// that comes from a monitor command must not size an allocation unbounded.
pub const MAX_RING_SIZE: usize = 1 << 30;

/// Why a ring size is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingSizeError {
    /// Zero, negative, or not a power of two (QEMU's message).
    #[error("size of ringbuf chardev must be power of two")]
    NotPowerOfTwo,
    /// Larger than [`MAX_RING_SIZE`].
    #[error("size of ringbuf chardev must not exceed {MAX_RING_SIZE} bytes")]
    TooLarge,
}

/// Checks a requested ring size (as QMP and `-chardev` give it).
///
/// QEMU accepts a size of 0 (and then crashes on the first write); it is
/// refused here as not a power of two.
pub fn check_ring_size(size: i64) -> Result<usize, RingSizeError> {
    if size <= 0 || size & (size - 1) != 0 {
        return Err(RingSizeError::NotPowerOfTwo);
    }
    let size = usize::try_from(size).map_err(|_| RingSizeError::TooLarge)?;
    if size > MAX_RING_SIZE {
        return Err(RingSizeError::TooLarge);
    }
    Ok(size)
}

struct Ring {
    buf: Box<[u8]>,
    /// Stream offset one past the newest byte.
    prod: u64,
    /// Stream offset of the oldest byte still held.
    cons: u64,
    /// Bytes dropped by the overwrite rule since creation.
    overwritten: u64,
    /// Whether the overwrite rule dropped bytes since the last read.
    lost_since_read: bool,
}

/// What one read returned: where it starts in the stream of everything ever
/// written, and whether bytes were overwritten unread since the previous read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadInfo {
    /// Stream offset of the first byte returned (bytes written before it and
    /// not returned by an earlier read were overwritten).
    pub offset: u64,
    /// Number of bytes returned.
    pub len: usize,
    /// Whether the overwrite rule dropped unread bytes since the last read.
    pub lost: bool,
}

/// A fixed-size, overwriting, thread-safe byte ring.
///
/// ```
/// use chardev_ringbuf::RingBuf;
/// let ring = RingBuf::new(4).unwrap();
/// ring.write(b"abcdef"); // 4 bytes fit: "ab" is overwritten
/// assert_eq!(ring.len(), 4);
/// assert_eq!(ring.read_vec(3), b"cde");
/// assert_eq!(ring.read_vec(100), b"f");
/// assert_eq!(ring.overwritten(), 2);
/// ```
pub struct RingBuf {
    inner: Mutex<Ring>,
    size: usize,
}

impl std::fmt::Debug for RingBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBuf")
            .field("size", &self.size)
            .field("len", &self.len())
            .finish()
    }
}

impl RingBuf {
    /// A ring of `size` bytes (a power of two, at most [`MAX_RING_SIZE`]).
    pub fn new(size: usize) -> Result<Self, RingSizeError> {
        let size = check_ring_size(i64::try_from(size).map_err(|_| RingSizeError::TooLarge)?)?;
        Ok(RingBuf {
            inner: Mutex::new(Ring {
                buf: vec![0u8; size].into_boxed_slice(),
                prod: 0,
                cons: 0,
                overwritten: 0,
                lost_since_read: false,
            }),
            size,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock cannot leave the ring inconsistent
        // (counters are updated after the copies), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ring's size in bytes.
    pub fn capacity(&self) -> usize {
        self.size
    }

    /// The number of bytes held (unread).
    pub fn len(&self) -> usize {
        let r = self.lock();
        (r.prod - r.cons) as usize
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total bytes ever written.
    pub fn written(&self) -> u64 {
        self.lock().prod
    }

    /// Total bytes dropped unread by the overwrite rule.
    pub fn overwritten(&self) -> u64 {
        self.lock().overwritten
    }

    /// Appends `data`, overwriting the oldest bytes when full. Always accepts
    /// everything and returns `data.len()`.
    pub fn write(&self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        let size = self.size;
        let mask = (size - 1) as u64;
        let mut r = self.lock();
        // Only the last `size` bytes of `data` can survive.
        let skip = data.len().saturating_sub(size);
        let keep = &data[skip..];
        let start = ((r.prod + skip as u64) & mask) as usize;
        let first = keep.len().min(size - start);
        r.buf[start..start + first].copy_from_slice(&keep[..first]);
        r.buf[..keep.len() - first].copy_from_slice(&keep[first..]);
        r.prod += data.len() as u64;
        let oldest = r.prod.saturating_sub(size as u64);
        if oldest > r.cons {
            r.overwritten += oldest - r.cons;
            r.cons = oldest;
            r.lost_since_read = true;
        }
        data.len()
    }

    fn copy_out(r: &Ring, size: usize, from: u64, out: &mut [u8]) {
        let start = (from & (size as u64 - 1)) as usize;
        let first = out.len().min(size - start);
        out[..first].copy_from_slice(&r.buf[start..start + first]);
        let rest = out.len() - first;
        out[first..].copy_from_slice(&r.buf[..rest]);
    }

    /// Reads the oldest bytes into `out`; returns where they were in the
    /// stream and how many were read.
    pub fn read_at(&self, out: &mut [u8]) -> ReadInfo {
        let mut r = self.lock();
        let n = ((r.prod - r.cons) as usize).min(out.len());
        let offset = r.cons;
        Self::copy_out(&r, self.size, offset, &mut out[..n]);
        r.cons += n as u64;
        let lost = std::mem::take(&mut r.lost_since_read);
        ReadInfo {
            offset,
            len: n,
            lost,
        }
    }

    /// Reads the oldest bytes into `out`; returns how many were read.
    pub fn read(&self, out: &mut [u8]) -> usize {
        self.read_at(out).len
    }

    /// Reads at most `max` of the oldest bytes. The allocation is bounded by
    /// the ring's content, whatever `max` is.
    pub fn read_vec(&self, max: usize) -> Vec<u8> {
        self.read_with(max, |bytes, _| bytes.len()).0
    }

    /// Peeks at most `max` of the oldest bytes and consumes as many of them
    /// as `decide` returns (clamped to what it saw), atomically with respect
    /// to writers. `decide` also learns whether bytes were overwritten
    /// unread since the last read. Returns the consumed bytes and the
    /// [`ReadInfo`] of the read.
    pub fn read_with(
        &self,
        max: usize,
        decide: impl FnOnce(&[u8], bool) -> usize,
    ) -> (Vec<u8>, ReadInfo) {
        let mut r = self.lock();
        let n = ((r.prod - r.cons) as usize).min(max);
        let mut bytes = vec![0u8; n];
        let offset = r.cons;
        Self::copy_out(&r, self.size, offset, &mut bytes);
        let lost = std::mem::take(&mut r.lost_since_read);
        let take = decide(&bytes, lost).min(n);
        r.cons += take as u64;
        bytes.truncate(take);
        (
            bytes,
            ReadInfo {
                offset,
                len: take,
                lost,
            },
        )
    }

    /// Drops everything held.
    pub fn clear(&self) {
        let mut r = self.lock();
        r.cons = r.prod;
        r.lost_since_read = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(RingBuf::new(1).is_ok());
        assert!(RingBuf::new(65536).is_ok());
        assert_eq!(RingBuf::new(0).unwrap_err(), RingSizeError::NotPowerOfTwo);
        assert_eq!(RingBuf::new(3).unwrap_err(), RingSizeError::NotPowerOfTwo);
        assert_eq!(
            RingBuf::new(MAX_RING_SIZE * 2).unwrap_err(),
            RingSizeError::TooLarge
        );
        assert_eq!(check_ring_size(-1), Err(RingSizeError::NotPowerOfTwo));
        assert_eq!(check_ring_size(i64::MIN), Err(RingSizeError::NotPowerOfTwo));
        assert_eq!(check_ring_size(1 << 62), Err(RingSizeError::TooLarge));
        assert_eq!(check_ring_size(4096), Ok(4096));
    }

    #[test]
    fn exactly_full_then_one_more() {
        let r = RingBuf::new(8).unwrap();
        r.write(b"01234567");
        assert_eq!(r.len(), 8);
        assert_eq!(r.overwritten(), 0);
        r.write(b"8");
        assert_eq!(r.len(), 8);
        assert_eq!(r.overwritten(), 1);
        let mut out = [0u8; 16];
        let info = r.read_at(&mut out);
        assert_eq!(&out[..info.len], b"12345678");
        assert_eq!(info.offset, 1);
        assert!(info.lost);
        assert!(r.is_empty());
    }

    #[test]
    fn wrap_around_many_times() {
        let r = RingBuf::new(4).unwrap();
        let mut expect = Vec::new();
        let mut got = Vec::new();
        for i in 0u8..200 {
            let chunk = [i, i.wrapping_add(1), i.wrapping_add(2)];
            r.write(&chunk[..(i % 3) as usize + 1]);
            expect.extend_from_slice(&chunk[..(i % 3) as usize + 1]);
            got.extend(r.read_vec((i % 4) as usize + 1));
        }
        got.extend(r.read_vec(10));
        // Reads always keep up (each read takes at least as much as the
        // write), except that a read of 1..4 may lag: check via offsets.
        assert_eq!(r.written() as usize, expect.len());
        assert_eq!(got.len() as u64 + r.overwritten(), r.written());
    }

    #[test]
    fn size_one() {
        let r = RingBuf::new(1).unwrap();
        r.write(b"abc");
        assert_eq!(r.len(), 1);
        assert_eq!(r.overwritten(), 2);
        assert_eq!(r.read_vec(5), b"c");
        assert_eq!(r.read_vec(5), b"");
        r.write(b"x");
        assert_eq!(r.read_vec(1), b"x");
    }

    #[test]
    fn read_larger_than_content_and_empty() {
        let r = RingBuf::new(16).unwrap();
        assert_eq!(r.read_vec(usize::MAX), b"");
        r.write(b"hello");
        assert_eq!(r.read_vec(usize::MAX), b"hello");
        assert_eq!(r.read_vec(1), b"");
    }

    #[test]
    fn write_larger_than_ring_keeps_tail() {
        let r = RingBuf::new(4).unwrap();
        r.write(b"ab");
        r.write(b"0123456789");
        assert_eq!(r.overwritten(), 8);
        let mut out = [0u8; 4];
        let info = r.read_at(&mut out);
        assert_eq!(&out, b"6789");
        assert_eq!(info.offset, 8);
        assert_eq!(r.written(), 12);
    }

    #[test]
    fn overwrite_between_partial_reads() {
        let r = RingBuf::new(4).unwrap();
        r.write(b"abcd");
        assert_eq!(r.read_vec(2), b"ab");
        r.write(b"efgh"); // "cd" overwritten
        let mut out = [0u8; 4];
        let info = r.read_at(&mut out);
        assert_eq!(&out[..info.len], b"efgh");
        assert_eq!(info.offset, 4);
        assert!(info.lost);
        assert_eq!(r.overwritten(), 2);
    }

    #[test]
    fn read_with_consumes_only_what_decided() {
        let r = RingBuf::new(8).unwrap();
        r.write(b"abcdef");
        let (got, info) = r.read_with(4, |b, lost| {
            assert_eq!(b, b"abcd");
            assert!(!lost);
            2
        });
        assert_eq!(got, b"ab");
        assert_eq!(info.len, 2);
        assert_eq!(r.read_vec(10), b"cdef");
        let (got, _) = r.read_with(4, |_, _| 99);
        assert!(got.is_empty());
    }

    #[test]
    fn clear_drops_content() {
        let r = RingBuf::new(8).unwrap();
        r.write(b"abc");
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.overwritten(), 0);
    }
}
