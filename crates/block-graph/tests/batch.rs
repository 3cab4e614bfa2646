//! Batched requests (`BlockBackend::submit_batch`) through qcow2 and file, page cache and
//! O_DIRECT, judged by the single-request path and by QEMU's tools.

mod common;

use std::sync::Arc;

use block_graph::batch::BatchReq;
use block_graph::node::Aio;
use block_graph::{BlockBackend, BlockGraph, WriteFlags};
use common::*;
use serde_json::json;

const CL: u64 = 65536;

fn backend(g: &mut BlockGraph, img: &std::path::Path, direct: bool) -> Arc<BlockBackend> {
    backend_aio(g, img, direct, "threads")
}

/// [`backend`] with `aio` set on the qcow2 node (its file child inherits it).
fn backend_aio(
    g: &mut BlockGraph,
    img: &std::path::Path,
    direct: bool,
    aio: &str,
) -> Arc<BlockBackend> {
    let n = g
        .blockdev_add(&opts(json!({
            "driver": "qcow2", "node-name": "q", "cache": {"direct": direct}, "aio": aio,
            "file": {"driver": "file", "filename": img.to_str().unwrap()}
        })))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("v")).unwrap();
    be
}

/// Writes `bufs` at `offs` in one batch, checks every result, reads them back in one batch
/// and with single requests.
fn round_trip(be: &BlockBackend, offs: &[u64], bufs: &[Vec<u8>]) {
    let mut w: Vec<BatchReq<'_>> = offs
        .iter()
        .zip(bufs)
        .map(|(&o, b)| BatchReq::write(o, b))
        .collect();
    be.submit_batch(&mut w);
    for (i, r) in w.iter().enumerate() {
        assert!(
            matches!(r.result, Some(Ok(()))),
            "write {i}: {:?}",
            r.result
        );
    }
    drop(w);
    let mut back: Vec<Vec<u8>> = bufs.iter().map(|b| vec![0u8; b.len()]).collect();
    let mut rq: Vec<BatchReq<'_>> = offs
        .iter()
        .zip(back.iter_mut())
        .map(|(&o, b)| BatchReq::read(o, b))
        .collect();
    be.submit_batch(&mut rq);
    assert!(rq.iter().all(|r| matches!(r.result, Some(Ok(())))));
    drop(rq);
    for (i, (o, b)) in offs.iter().zip(bufs).enumerate() {
        assert!(&back[i] == b, "batched read {i} at {o} differs");
        let mut one = vec![0u8; b.len()];
        be.read_buf(*o, &mut one).unwrap();
        assert!(&one == b, "single read {i} at {o} differs");
    }
}

#[test]
fn batches_allocate_rewrite_and_read_back() {
    allocate_rewrite_and_read_back("threads");
}

/// `aio=io_uring` sends batches through io_uring through the page cache too.
#[test]
fn io_uring_batches_allocate_rewrite_and_read_back() {
    if let Err(e) = io_uring::IoUring::new(2) {
        // Where the kernel refuses a ring (seccomp, old kernel), the node fails to open,
        // as QEMU's does.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("u.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
        let err = BlockGraph::new()
            .blockdev_add(&opts(json!({
                "driver": "qcow2", "node-name": "q", "aio": "io_uring",
                "file": {"driver": "file", "filename": img.to_str().unwrap()}
            })))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Unable to use io_uring: failed to init linux io_uring ring: "),
            "{err} ({e})"
        );
        return;
    }
    allocate_rewrite_and_read_back("io_uring");
}

fn allocate_rewrite_and_read_back(aio: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let raw = dir.path().join("a.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "16M"]);
    let mut offs = Vec::new();
    let mut bufs = Vec::new();
    // 36 requests: fresh clusters, two halves of one new cluster (the second waits for
    // the first one's allocation), unaligned and cross-cluster ones; then a second batch
    // of rewrites (requests of one batch run concurrently, so they must not overlap).
    for i in 0..32u64 {
        offs.push(i * 3 * CL + (i % 4) * 4096);
        bufs.push(pattern(i, 1, 4096));
    }
    offs.push(100 * CL);
    bufs.push(pattern(100, 1, 32768));
    offs.push(100 * CL + 32768);
    bufs.push(pattern(101, 1, 32768));
    offs.push(120 * CL - 1000);
    bufs.push(pattern(102, 1, 3000));
    offs.push(130 * CL + 7);
    bufs.push(pattern(103, 1, 513));
    let first = offs.len();
    for i in 0..4u64 {
        offs.push(i * 3 * CL);
        bufs.push(pattern(i, 2, 8192));
    }
    {
        let mut g = BlockGraph::new();
        let be = backend_aio(&mut g, &img, false, aio);
        let file = g.find_node("q").unwrap().child("file").unwrap().node();
        let want = if aio == "io_uring" {
            Aio::IoUring
        } else {
            Aio::Threads
        };
        assert_eq!(file.options().aio, want, "the file child inherits aio");
        round_trip(&be, &offs[..first], &bufs[..first]);
        round_trip(&be, &offs[first..], &bufs[first..]);
        // The backend does not account (its device does, as in QEMU).
        let st = be.stats().report(0);
        assert_eq!((st.wr_operations, st.rd_operations), (0, 0));
        g.close_all();
    }
    // The same writes, in the same order, on a raw image: the images must match.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        for (o, b) in offs.iter().zip(&bufs) {
            f.seek(SeekFrom::Start(*o)).unwrap();
            f.write_all(b).unwrap();
        }
    }
    assert_clean(&img);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

#[test]
fn direct_io_batches_mix_aligned_and_bounced_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let mut g = BlockGraph::new();
    let Ok(n) = g.blockdev_add(&opts(json!({
        "driver": "qcow2", "node-name": "q", "cache": {"direct": true},
        "file": {"driver": "file", "filename": img.to_str().unwrap()}
    }))) else {
        eprintln!("O_DIRECT not supported on this file system: skipped");
        return;
    };
    drop(n);
    g.blockdev_del("q").unwrap();
    let be = backend(&mut g, &img, true);
    // Aligned 4 KiB buffers (go to io_uring), and unaligned ones (bounced).
    let mut aligned: Vec<qcow2::AlignedBuf> = (0..8)
        .map(|i| {
            let mut b = qcow2::AlignedBuf::new(4096, 4096);
            b.copy_from_slice(&pattern(i, 3, 4096));
            b
        })
        .collect();
    let odd = pattern(9, 3, 1000);
    {
        let mut reqs: Vec<BatchReq<'_>> = aligned
            .iter()
            .enumerate()
            .map(|(i, b)| BatchReq::write(i as u64 * CL, b))
            .collect();
        reqs.push(BatchReq::write(20 * CL + 100, &odd));
        be.submit_batch(&mut reqs);
        assert!(reqs.iter().all(|r| matches!(r.result, Some(Ok(())))));
    }
    for b in aligned.iter_mut() {
        b.fill(0);
    }
    // Reads with at most 3 in flight: a sliding window over the 8 aligned ones.
    block_graph::batch::set_queue_depth(3);
    assert_eq!(block_graph::batch::queue_depth(), 3);
    let mut odd_back = vec![0u8; 1000];
    {
        let mut reqs: Vec<BatchReq<'_>> = aligned
            .iter_mut()
            .enumerate()
            .map(|(i, b)| BatchReq::read(i as u64 * CL, b))
            .collect();
        reqs.push(BatchReq::read(20 * CL + 100, &mut odd_back));
        be.submit_batch(&mut reqs);
        assert!(reqs.iter().all(|r| matches!(r.result, Some(Ok(())))));
    }
    for (i, b) in aligned.iter().enumerate() {
        assert_eq!(&b[..], &pattern(i as u64, 3, 4096)[..], "block {i}");
    }
    assert_eq!(odd_back, odd);
    g.close_all();
    drop(be);
    drop(g);
    assert_clean(&img);
}

#[test]
fn invalid_requests_fail_alone() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(json!({
            "driver": "null-co", "node-name": "n", "size": 1 << 20, "read-zeroes": true
        })))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("v")).unwrap();
    let bm = block_graph::DirtyBitmap::new("b", 65536, 1 << 20).unwrap();
    n.add_bitmap(Arc::new(bm)).unwrap();
    let mut a = [1u8; 512];
    let data = [2u8; 512];
    let mut reqs = vec![
        BatchReq::read(0, &mut a),
        BatchReq::write(1 << 20, &data),
        BatchReq::write(65536, &data),
    ];
    be.submit_batch(&mut reqs);
    assert!(matches!(reqs[0].result, Some(Ok(()))));
    assert_eq!(
        reqs[1]
            .result
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .errno_value(),
        libc::EIO
    );
    assert!(matches!(reqs[2].result, Some(Ok(()))));
    drop(reqs);
    assert_eq!(a, [0u8; 512]);
    let st = be.stats().report(n.wr_highest_offset());
    assert_eq!(
        (st.rd_operations, st.wr_operations, st.invalid_wr_operations),
        (0, 0, 0),
        "a device accounts, not the backend"
    );
    assert_eq!(st.wr_highest_offset, 65536 + 512);
    let b = n.bitmap("b").unwrap();
    assert_eq!(b.count(), 65536, "the batched write set its bitmap");
    // Without medium every request fails with ENOMEDIUM.
    let empty = g.create_backend("e", None, Default::default()).unwrap();
    let mut c = [0u8; 16];
    let mut reqs = vec![BatchReq::read(0, &mut c)];
    empty.submit_batch(&mut reqs);
    assert_eq!(
        reqs[0]
            .result
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .errno_value(),
        libc::ENOMEDIUM
    );
    let _ = WriteFlags::default();
}

#[test]
fn concurrent_batches_allocating_the_same_clusters_lose_nothing() {
    concurrent_batches(false);
}

#[test]
fn concurrent_direct_io_batches_allocating_the_same_clusters_lose_nothing() {
    concurrent_batches(true);
}

fn concurrent_batches(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let mut g = BlockGraph::new();
    if direct
        && g.blockdev_add(&opts(json!({
            "driver": "file", "node-name": "probe", "cache": {"direct": true},
            "filename": img.to_str().unwrap()})))
            .is_err()
    {
        eprintln!("O_DIRECT not supported on this file system: skipped");
        return;
    }
    if direct {
        g.blockdev_del("probe").unwrap();
    }
    let be = backend(&mut g, &img, direct);
    // Two threads, each writing one half of the same 32 new clusters in batches of 8: a
    // half whose cluster the other thread (or its own batch) is allocating waits for it.
    let hs: Vec<_> = (0..2u64)
        .map(|t| {
            let be = be.clone();
            std::thread::spawn(move || {
                // Aligned buffers: with O_DIRECT they go to io_uring as they are.
                let bufs: Vec<qcow2::AlignedBuf> = (0..32)
                    .map(|c| {
                        let mut b = qcow2::AlignedBuf::new(32768, 4096);
                        b.copy_from_slice(&pattern(c, t, 32768));
                        b
                    })
                    .collect();
                for chunk in 0..4u64 {
                    let mut reqs: Vec<BatchReq<'_>> = (chunk * 8..chunk * 8 + 8)
                        .map(|c| BatchReq::write(c * CL + t * 32768, &bufs[c as usize]))
                        .collect();
                    be.submit_batch(&mut reqs);
                    assert!(reqs.iter().all(|r| matches!(r.result, Some(Ok(())))));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for c in 0..32u64 {
        for t in 0..2u64 {
            let mut b = qcow2::AlignedBuf::new(32768, 4096);
            be.read_buf(c * CL + t * 32768, &mut b).unwrap();
            assert!(b[..] == pattern(c, t, 32768)[..], "cluster {c} half {t}");
        }
    }
    drop(be);
    g.close_all();
    drop(g);
    assert_clean(&img);
}
