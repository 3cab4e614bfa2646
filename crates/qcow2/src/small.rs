//! A vector that keeps its first `N` elements inline, so the per-request bookkeeping of the
//! write path (one or a few clusters per request) needs no heap allocation; longer requests
//! spill to a `Vec`.

use std::ops::Deref;

/// Up to `N` `Copy` elements inline, more on the heap.
pub(crate) enum SmallVec<T: Copy + Default, const N: usize> {
    /// `len` elements at the start of `buf`.
    Inline { buf: [T; N], len: usize },
    /// Spilled.
    Heap(Vec<T>),
}

impl<T: Copy + Default, const N: usize> SmallVec<T, N> {
    /// An empty vector (no allocation).
    pub(crate) fn new() -> Self {
        SmallVec::Inline {
            buf: [T::default(); N],
            len: 0,
        }
    }

    /// An empty vector with room for `n` elements: inline when they fit, else one heap
    /// allocation of the right size.
    pub(crate) fn with_capacity(n: usize) -> Self {
        if n <= N {
            Self::new()
        } else {
            SmallVec::Heap(Vec::with_capacity(n))
        }
    }

    /// Appends `v`, moving everything to the heap when the inline part is full.
    pub(crate) fn push(&mut self, v: T) {
        match self {
            SmallVec::Inline { buf, len } if *len < N => {
                buf[*len] = v;
                *len += 1;
            }
            SmallVec::Inline { buf, len } => {
                let mut heap = Vec::with_capacity(2 * N.max(1));
                heap.extend_from_slice(&buf[..*len]);
                heap.push(v);
                *self = SmallVec::Heap(heap);
            }
            SmallVec::Heap(h) => h.push(v),
        }
    }

    /// Removes every element (keeps a spilled buffer for reuse).
    pub(crate) fn clear(&mut self) {
        match self {
            SmallVec::Inline { len, .. } => *len = 0,
            SmallVec::Heap(h) => h.clear(),
        }
    }
}

impl<T: Copy + Default, const N: usize> Deref for SmallVec<T, N> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            SmallVec::Inline { buf, len } => &buf[..*len],
            SmallVec::Heap(h) => h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SmallVec;

    #[test]
    fn inline_then_spilled() {
        let mut v: SmallVec<u64, 2> = SmallVec::new();
        assert!(v.is_empty());
        v.push(1);
        v.push(2);
        assert!(matches!(v, SmallVec::Inline { .. }));
        v.push(3);
        assert!(matches!(v, SmallVec::Heap(_)));
        assert_eq!(&*v, &[1, 2, 3]);
        v.clear();
        assert!(v.is_empty());
        v.push(4);
        assert_eq!(&*v, &[4]);
        assert!(matches!(
            SmallVec::<u64, 2>::with_capacity(2),
            SmallVec::Inline { .. }
        ));
        let mut h: SmallVec<u64, 2> = SmallVec::with_capacity(5);
        for i in 0..5 {
            h.push(i);
        }
        assert!(matches!(&h, SmallVec::Heap(v) if v.capacity() == 5));
        assert_eq!(&*h, &[0, 1, 2, 3, 4]);
    }
}
