//! Copy offload, as QEMU's `bdrv_co_copy_range`: a job copying a range from one node to
//! another lets the kernel move the bytes (`copy_file_range(2)`) when both sides resolve to
//! host files, instead of reading them into a buffer and writing them back.
//!
//! The source side goes down the graph with [`BlockDriver::copy_range_from`] (a qcow2 node
//! maps the guest range to its data file; the file node hands out its descriptor), then calls
//! the target side, which goes down with [`BlockDriver::copy_range_to`] (a qcow2 node
//! allocates the clusters as for a write, the file node copies, the qcow2 node publishes the
//! mapping). A qcow2 range its backing node provides is copied from there. Each node on the
//! way does what its generic layer does for a write (drain tracking, dirty bitmaps, write
//! threshold, growth). Where a side cannot (zeros, compressed clusters, filters,
//! `O_DIRECT`), nothing is copied and the caller reads
//! and writes as before; a kernel that refuses `copy_file_range` between two files (`EXDEV`,
//! `EOPNOTSUPP`, `EINVAL`, `ENOSYS`) gets `pread`/`pwrite` instead.
//!
//! [`BlockDriver::copy_range_from`]: crate::BlockDriver::copy_range_from
//! [`BlockDriver::copy_range_to`]: crate::BlockDriver::copy_range_to

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::driver::CopyExtent;
use crate::error::{BlockError, Result};
use crate::node::Edge;
use crate::perm::Perm;
use crate::BlockBackend;

/// Set once the kernel has said it has no `copy_file_range` at all.
static NO_COPY_FILE_RANGE: AtomicBool = AtomicBool::new(false);

/// Bytes per `pread`/`pwrite` of the fallback.
const FALLBACK_CHUNK: u64 = 1 << 20;

/// A failed copy offload: which side failed, and how.
#[derive(Debug)]
pub struct CopyRangeError {
    /// Whether the source side failed (the target side otherwise, including the copy itself).
    pub is_read: bool,
    /// The error.
    pub error: BlockError,
}

/// Copies `[offset, offset + len)` of the node behind `src` to the same range of the node
/// behind `dst` by copy offload, as far as both sides support it from `offset` on. Returns
/// the bytes copied from `offset` (0: the first part cannot be offloaded; the caller copies
/// the rest, `[offset + n, offset + len)`, by reading and writing).
pub fn copy_range(
    src: &Edge,
    dst: &Edge,
    offset: u64,
    len: u64,
) -> std::result::Result<u64, CopyRangeError> {
    if !dst.perm().contains(Perm::WRITE) {
        return Ok(0);
    }
    dst.with_node(|d| {
        if !d.driver().can_copy_range_to() {
            return Ok(0);
        }
        src.with_node(|s| {
            let mut done = 0u64;
            while done < len {
                let mut target_failed = false;
                let at = offset + done;
                let r = s.copy_range_from(at, len - done, &mut |ext: &CopyExtent| {
                    let r = d.copy_range_to(at, ext);
                    target_failed = r.is_err();
                    r
                });
                match r {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(error) => {
                        return Err(CopyRangeError {
                            is_read: !target_failed,
                            error,
                        })
                    }
                }
            }
            Ok(done)
        })
    })
}

/// [`copy_range`] between the roots of two backends (a job's own backends), each passing
/// its backend's drain gate as their requests do.
pub fn copy_range_backends(
    src: &BlockBackend,
    dst: &BlockBackend,
    offset: u64,
    len: u64,
) -> std::result::Result<u64, CopyRangeError> {
    let (si, di) = (src.root_info(), dst.root_info());
    let _gs = si.gate.enter();
    let _gd = di.gate.enter();
    match (src.root_edge(), dst.root_edge()) {
        (Some(s), Some(d)) => copy_range(&s, &d, offset, len),
        _ => Ok(0),
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Copies all of `src` to `dst_fd` at `dst_off` with `copy_file_range(2)`, or with
/// `pread`/`pwrite` where the kernel refuses to copy between these two files.
pub(crate) fn copy_file_range_full(src: &CopyExtent, dst_fd: RawFd, dst_off: u64) -> Result<()> {
    let mut done = 0u64;
    while done < src.len && !NO_COPY_FILE_RANGE.load(Ordering::Relaxed) {
        let mut off_in = (src.offset + done) as libc::loff_t;
        let mut off_out = (dst_off + done) as libc::loff_t;
        let want = (src.len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open (their nodes are held by the caller for the
        // call) and the offsets are plain integers the kernel reads and updates.
        let r =
            unsafe { libc::copy_file_range(src.fd, &mut off_in, dst_fd, &mut off_out, want, 0) };
        if r < 0 {
            match errno() {
                libc::EINTR => continue,
                libc::ENOSYS => {
                    NO_COPY_FILE_RANGE.store(true, Ordering::Relaxed);
                    break;
                }
                libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL => break,
                e => return Err(BlockError::errno(e)),
            }
        }
        if r == 0 {
            // The source file ends inside the range.
            return Err(BlockError::errno(libc::EIO));
        }
        done += r as u64;
    }
    if done < src.len {
        log::debug!(
            "copy_file_range refused: pread/pwrite for {} bytes",
            src.len - done
        );
        copy_by_hand(src, done, dst_fd, dst_off)?;
    }
    start_writeback(dst_fd, dst_off, src.len);
    Ok(())
}

/// Starts writing the copied range back to the disk without waiting for it: a copy job
/// flushes its target when it converges or ends, and that flush then finds most of the
/// data already written instead of writing it all at once (the disk works while the job
/// copies). Best effort: an error only means the flush does the work.
fn start_writeback(fd: RawFd, offset: u64, len: u64) {
    // SAFETY: a plain syscall on an open descriptor, no memory passed.
    let r = unsafe {
        libc::sync_file_range(
            fd,
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r < 0 {
        log::debug!("sync_file_range: {}", std::io::Error::last_os_error());
    }
}

/// The fallback of [`copy_file_range_full`]: `pread`/`pwrite` from `done` on.
fn copy_by_hand(src: &CopyExtent, mut done: u64, dst_fd: RawFd, dst_off: u64) -> Result<()> {
    let mut buf = vec![0u8; (src.len - done).min(FALLBACK_CHUNK) as usize];
    while done < src.len {
        let n = ((src.len - done) as usize).min(buf.len());
        let mut got = 0usize;
        while got < n {
            // SAFETY: reads into the first `n` bytes of `buf`, which we own.
            let r = unsafe {
                libc::pread(
                    src.fd,
                    buf[got..n].as_mut_ptr().cast(),
                    n - got,
                    (src.offset + done + got as u64) as libc::off_t,
                )
            };
            if r < 0 && errno() == libc::EINTR {
                continue;
            }
            if r <= 0 {
                return Err(BlockError::errno(if r == 0 { libc::EIO } else { errno() }));
            }
            got += r as usize;
        }
        let mut put = 0usize;
        while put < n {
            // SAFETY: writes from the first `n` bytes of `buf`, filled above.
            let r = unsafe {
                libc::pwrite(
                    dst_fd,
                    buf[put..n].as_ptr().cast(),
                    n - put,
                    (dst_off + done + put as u64) as libc::off_t,
                )
            };
            if r < 0 && errno() == libc::EINTR {
                continue;
            }
            if r <= 0 {
                return Err(BlockError::errno(if r == 0 { libc::EIO } else { errno() }));
            }
            put += r as usize;
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn copy_file_range_full_and_the_fallback_copy_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * FALLBACK_CHUNK as usize + 1234)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut a = std::fs::File::create(dir.path().join("a")).unwrap();
        a.write_all(&data).unwrap();
        let a = std::fs::File::open(dir.path().join("a")).unwrap();
        let src = CopyExtent {
            fd: a.as_raw_fd(),
            offset: 1000,
            len: data.len() as u64 - 1000,
        };
        for (name, by_hand) in [("b", false), ("c", true)] {
            let path = dir.path().join(name);
            let b = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            if by_hand {
                copy_by_hand(&src, 0, b.as_raw_fd(), 4096).unwrap();
            } else {
                copy_file_range_full(&src, b.as_raw_fd(), 4096).unwrap();
            }
            let mut got = Vec::new();
            std::fs::File::open(&path)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got.len(), 4096 + data.len() - 1000);
            assert!(got[..4096].iter().all(|&b| b == 0));
            assert_eq!(&got[4096..], &data[1000..], "{name}");
        }
        // A range past the source's end is an error, not a short copy.
        let past = CopyExtent {
            fd: a.as_raw_fd(),
            offset: data.len() as u64 - 10,
            len: 20,
        };
        let b = std::fs::File::create(dir.path().join("d")).unwrap();
        assert!(copy_file_range_full(&past, b.as_raw_fd(), 0).is_err());
        assert!(copy_by_hand(&past, 0, b.as_raw_fd(), 0).is_err());
    }

    fn qemu(prog: &str, args: &[&str]) -> bool {
        std::process::Command::new(prog)
            .args(args)
            .status()
            .expect(prog)
            .success()
    }

    #[test]
    fn qcow2_to_qcow2_offloads_data_and_backing_data_and_leaves_zeros_to_the_caller() {
        use crate::{BlockGraph, DirtyBitmap};
        use qapi_types::{BlockdevOptions, QapiType};
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let (base, src, dst) = (p("base.qcow2"), p("src.qcow2"), p("dst.qcow2"));
        assert!(qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &base, "4M"]
        ));
        assert!(qemu(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 0 4M", &base]
        ));
        assert!(qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &src]
        ));
        // Data at 0..1M+4k (not cluster aligned at the end), zeros at 2M..2M+64k, the rest
        // from the backing file.
        for cmd in [
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 4k",
            "write -z 2M 64k",
        ] {
            assert!(qemu("qemu-io", &["-f", "qcow2", "-c", cmd, &src]));
        }
        assert!(qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &dst, "4M"]
        ));
        {
            let mut g = BlockGraph::new();
            let mut add = |file: &str, name: &str| {
                let o = BlockdevOptions::from_qmp_strict(serde_json::json!({
                    "driver": "qcow2", "node-name": name,
                    "file": {"driver": "file", "filename": file}}))
                .unwrap();
                g.blockdev_add(&o).unwrap()
            };
            let (s, d) = (add(&src, "s"), add(&dst, "d"));
            let bm = std::sync::Arc::new(DirtyBitmap::new("bm", 65536, 4 << 20).unwrap());
            d.add_bitmap(bm.clone()).unwrap();
            let sb = g
                .new_root(&s, Perm::CONSISTENT_READ, Perm::ALL, "a job")
                .unwrap();
            let db = g
                .new_root(&d, Perm::WRITE | Perm::CONSISTENT_READ, Perm::ALL, "a job")
                .unwrap();
            // The source's own data clusters and, after them, the backing file's data
            // (from base.qcow2's data) go by the kernel, up to the zero clusters at 2M.
            let n = copy_range_backends(&sb, &db, 0, 4 << 20).unwrap();
            assert_eq!(n, 2 << 20);
            assert_eq!(
                bm.count(),
                n,
                "the target's bitmap sees the offloaded writes"
            );
            // Zero clusters are the caller's; backing data further on goes by the kernel.
            assert_eq!(copy_range_backends(&sb, &db, 2 << 20, 65536).unwrap(), 0);
            assert_eq!(
                copy_range_backends(&sb, &db, 3 << 20, 65536).unwrap(),
                65536
            );
            // The caller's read+write for the rest, as the jobs do.
            let mut buf = vec![0u8; (4 << 20) - n as usize];
            sb.read_buf(n, &mut buf).unwrap();
            db.write_buf(n, &buf, crate::WriteFlags::default()).unwrap();
            db.flush().unwrap();
            g.flush_all().unwrap();
        }
        assert!(qemu("qemu-img", &["check", "-q", &dst]));
        assert!(qemu("qemu-img", &["compare", "-q", &src, &dst]));
    }
}
