//! Helpers for vectored buffers: every request carries a list of buffers (`&[IoSlice]` to
//! write, `&mut [IoSliceMut]` to read) so that guest memory scattered over several regions
//! needs no copy.

use std::io::{IoSlice, IoSliceMut};

/// Total length of a write vector.
#[inline]
pub fn iov_len(iov: &[IoSlice<'_>]) -> usize {
    // Most requests carry one buffer, and every layer asks: no loop for them.
    match iov {
        [one] => one.len(),
        _ => iov.iter().map(|s| s.len()).sum(),
    }
}

/// Total length of a read vector.
#[inline]
pub fn iov_len_mut(iov: &[IoSliceMut<'_>]) -> usize {
    match iov {
        [one] => one.len(),
        _ => iov.iter().map(|s| s.len()).sum(),
    }
}

/// The bytes `[off, off + len)` of a write vector as a new vector (no copy).
pub fn slice_iov<'a>(iov: &'a [IoSlice<'_>], off: usize, len: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::with_capacity(iov.len().min(4));
    let mut skip = off;
    let mut left = len;
    for s in iov {
        if left == 0 {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(left);
        out.push(IoSlice::new(&s[skip..skip + n]));
        left -= n;
        skip = 0;
    }
    out
}

/// The bytes `[off, off + len)` of a read vector as a new vector (no copy).
pub fn slice_iov_mut<'a>(
    iov: &'a mut [IoSliceMut<'_>],
    off: usize,
    len: usize,
) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::with_capacity(iov.len().min(4));
    let mut skip = off;
    let mut left = len;
    for s in iov.iter_mut() {
        if left == 0 {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(left);
        out.push(IoSliceMut::new(&mut s[skip..skip + n]));
        left -= n;
        skip = 0;
    }
    out
}

/// Fills a read vector with zeros.
pub fn zero_iov(iov: &mut [IoSliceMut<'_>]) {
    for s in iov.iter_mut() {
        s.fill(0);
    }
}

/// Copies `src` into a read vector from byte `off`; returns the bytes copied.
pub fn copy_to_iov(iov: &mut [IoSliceMut<'_>], off: usize, src: &[u8]) -> usize {
    let mut skip = off;
    let mut done = 0;
    for s in iov.iter_mut() {
        if done == src.len() {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(src.len() - done);
        s[skip..skip + n].copy_from_slice(&src[done..done + n]);
        done += n;
        skip = 0;
    }
    done
}

/// Copies bytes of a write vector from byte `off` into `dst`; returns the bytes copied.
pub fn copy_from_iov(iov: &[IoSlice<'_>], off: usize, dst: &mut [u8]) -> usize {
    let mut skip = off;
    let mut done = 0;
    for s in iov {
        if done == dst.len() {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(dst.len() - done);
        dst[done..done + n].copy_from_slice(&s[skip..skip + n]);
        done += n;
        skip = 0;
    }
    done
}

/// Copies a whole write vector into one buffer.
pub fn gather(iov: &[IoSlice<'_>]) -> Vec<u8> {
    let mut v = Vec::with_capacity(iov_len(iov));
    for s in iov {
        v.extend_from_slice(s);
    }
    v
}

/// Whether every byte of a write vector is zero (for `detect-zeroes`).
pub fn is_zero(iov: &[IoSlice<'_>]) -> bool {
    iov.iter().all(|s| {
        let mut chunks = s.chunks_exact(64);
        let body = chunks.by_ref().all(|c| {
            c.chunks_exact(8).fold(0u64, |acc, w| {
                acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
            }) == 0
        });
        body && chunks.remainder().iter().all(|b| *b == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cross_buffers() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let c = [6u8, 7, 8, 9];
        let iov = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        assert_eq!(iov_len(&iov), 9);
        let s = slice_iov(&iov, 2, 4);
        assert_eq!(gather(&s), vec![3, 4, 5, 6]);
        assert!(slice_iov(&iov, 9, 0).is_empty());
        let mut out = [0u8; 3];
        assert_eq!(copy_from_iov(&iov, 4, &mut out), 3);
        assert_eq!(out, [5, 6, 7]);
    }

    #[test]
    fn mutable_slices_write_through() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 3];
        {
            let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            assert_eq!(iov_len_mut(&iov), 6);
            let mut sub = slice_iov_mut(&mut iov, 1, 4);
            assert_eq!(copy_to_iov(&mut sub, 0, &[9, 8, 7, 6, 5]), 4);
        }
        assert_eq!(a, [0, 9, 8]);
        assert_eq!(b, [7, 6, 0]);
        let mut iov = [IoSliceMut::new(&mut a)];
        zero_iov(&mut iov);
        assert_eq!(a, [0; 3]);
    }

    #[test]
    fn zero_detection() {
        let z = vec![0u8; 4099];
        let mut nz = vec![0u8; 4099];
        assert!(is_zero(&[IoSlice::new(&z)]));
        nz[4098] = 1;
        assert!(!is_zero(&[IoSlice::new(&z), IoSlice::new(&nz)]));
        nz[4098] = 0;
        nz[7] = 1;
        assert!(!is_zero(&[IoSlice::new(&nz[1..])]));
    }
}
