//! Switching an open image between read-only and read-write use (QEMU's reopen), for a
//! block layer that keeps the image open while a job writes into a node that was opened
//! read-only (block-commit's base).

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::image::Qcow2;

impl Qcow2 {
    /// Whether the image is open for writing (opened writable, or reopened read-write).
    pub(crate) fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Makes an image opened read-only writable. The caller must make the underlying
    /// storage writable first and keep requests away meanwhile. Refused for images marked
    /// corrupt and for images left dirty by lazy refcounts (they need a repair, which
    /// only a writable open does). A no-op on an image that is already writable.
    ///
    /// [`Qcow2::close`] (or dropping the image) writes the cached metadata afterwards, as
    /// for an image opened writable.
    pub fn reopen_read_write(&self) -> Result<()> {
        if self.is_corrupt() {
            return Err(Error::CorruptionDetected(
                "image is marked corrupt and cannot be reopened read-write".into(),
            ));
        }
        if self.is_writable() && !self.is_read_only() {
            // Opened writable (perhaps closed by a reopen read-only since): open it again.
            self.closed.store(false, Ordering::SeqCst);
            return Ok(());
        }
        if self.dirty_marked.load(Ordering::Acquire) {
            return Err(Error::CorruptionDetected(
                "image was not closed cleanly (dirty bit set); repair it before writing".into(),
            ));
        }
        self.closed.store(false, Ordering::SeqCst);
        self.writable.store(true, Ordering::Release);
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }

    /// Makes a writable image read-only (QEMU's reopen with `read-only=on`, e.g. a commit
    /// job's base going back to read-only): waits for requests in flight, writes all cached
    /// metadata, applies the queued frees and, with lazy refcounts, clears the dirty bit, so
    /// the file is a clean image that other readers may open; then refuses writes. A no-op
    /// on an image that is read-only already. [`Qcow2::reopen_read_write`] undoes it.
    pub fn reopen_read_only(&self) -> Result<()> {
        if !self.is_writable() || self.is_read_only() {
            self.writable.store(false, Ordering::Release);
            self.read_only.store(true, Ordering::Release);
            return Ok(());
        }
        let _x = self.gate.exclusive();
        // Twice, as in close: the second pass applies frees retired by the first.
        self.flush()?;
        self.flush()?;
        if self.dirty_marked.load(Ordering::Acquire) {
            self.clear_dirty()?;
        }
        self.read_only.store(true, Ordering::Release);
        self.writable.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::storage::{MemStorage, Storage};
    use crate::{CreateOptions, OpenOptions, Qcow2};

    #[test]
    fn read_only_image_becomes_writable_and_its_writes_stick() {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
        Qcow2::create(st.clone(), &CreateOptions::new(1 << 20)).unwrap();
        let img = Qcow2::open(st.clone(), OpenOptions::default()).unwrap();
        assert!(img.is_read_only());
        assert!(img.write_at(&[7u8; 512], 4096).is_err());
        img.reopen_read_write().unwrap();
        assert!(!img.is_read_only());
        img.write_at(&[7u8; 512], 4096).unwrap();
        img.close().unwrap();
        drop(img);
        let again = Qcow2::open(st, OpenOptions::default()).unwrap();
        let mut buf = [0u8; 512];
        again.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [7u8; 512]);
    }
}
