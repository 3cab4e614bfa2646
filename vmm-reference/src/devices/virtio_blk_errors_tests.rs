//! The device-side accounting of the virtio-blk engine and its handling of
//! the BlockBackend's error policies (werror/rerror: report, ignore, stop
//! with the request kept and retried).

use super::tests::{desc, header, submit, DATA, HDR, NEXT, STATUS, WRITE};
use super::*;
use block_graph::{BackendOptions, BlockGraph, DeviceAttach};
use qapi_types::{BlockdevOnError, BlockdevOptions, QapiType};
// Used by the #[test] functions only, which benches/virtio_blk.rs (that
// includes this file) compiles without.
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
#[allow(unused_imports)]
use {
    super::tests::{disk_filled, mem},
    qapi_types::BlockDeviceIoStatus,
};

/// A 1 MiB raw disk over a blkdebug node whose rule fails, once, the first
/// request after `event` with `errno`; on a backend with `werror`/`rerror`.
fn failing_disk(
    dir: &std::path::Path,
    event: &str,
    errno: i32,
    werror: BlockdevOnError,
    rerror: BlockdevOnError,
) -> (BlockGraph, Arc<BlockBackend>) {
    let rule = serde_json::json!({"event": event, "errno": errno, "once": true});
    disk_with_rule(dir, rule, werror, rerror)
}

/// An engine on [`failing_disk`] in a new directory (each image is locked
/// by its graph).
fn failing_engine(
    event: &str,
    errno: i32,
    werror: BlockdevOnError,
    rerror: BlockdevOnError,
) -> (tempfile::TempDir, BlockGraph, Arc<BlockBackend>, BlkEngine) {
    let dir = tempfile::tempdir().unwrap();
    let (g, be) = failing_disk(dir.path(), event, errno, werror, rerror);
    let e = BlkEngine::new(be.clone(), false, "x");
    (dir, g, be, e)
}

/// A 1 MiB raw disk over a blkdebug node with the `inject-error` rule
/// `rule`; on a backend with `werror`/`rerror`.
fn disk_with_rule(
    dir: &std::path::Path,
    rule: serde_json::Value,
    werror: BlockdevOnError,
    rerror: BlockdevOnError,
) -> (BlockGraph, Arc<BlockBackend>) {
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let mut g = BlockGraph::new();
    let opts = BlockdevOptions::from_qmp_strict(serde_json::json!({
        "driver": "raw", "node-name": "fmt",
        "file": {
            "driver": "blkdebug", "node-name": "dbg",
            "image": {"driver": "file", "filename": path.to_str().unwrap()},
            "inject-error": [rule]
        }
    }))
    .unwrap();
    let node = g.blockdev_add(&opts).unwrap();
    let be_opts = BackendOptions {
        werror,
        rerror,
        ..Default::default()
    };
    let be = g.create_backend("disk", Some(&node), be_opts).unwrap();
    g.attach_device(&be, DeviceAttach::disk("virtio-disk0"))
        .unwrap();
    (g, be)
}

/// The `action` of every BLOCK_IO_ERROR the graph raised.
fn io_error_actions(g: &BlockGraph) -> Vec<String> {
    g.take_events()
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .filter(|e| e["event"] == "BLOCK_IO_ERROR")
        .map(|e| e["data"]["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn stats(be: &BlockBackend) -> qapi_types::BlockDeviceStats {
    be.stats().report(0)
}

/// A discard or write-zeroes request of one segment.
fn submit_segment(
    e: &mut BlkEngine,
    mem: &GuestMemoryMmap,
    kind: u32,
    start: u64,
    count: u32,
) -> u8 {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&start.to_le_bytes());
    seg[8..12].copy_from_slice(&count.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    submit(e, mem, kind, 0, Some((16, false)))
}

#[test]
fn completed_requests_are_accounted_by_type_and_discards_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk_filled(dir.path(), 0);
    let mut e = BlkEngine::new(be.clone(), false, "x");
    let mem = mem();
    assert_eq!(submit(&mut e, &mem, T_OUT, 8, Some((4096, false))), S_OK);
    assert_eq!(submit(&mut e, &mem, T_IN, 0, Some((1024, true))), S_OK);
    assert_eq!(submit(&mut e, &mem, T_FLUSH, 0, None), S_OK);
    assert_eq!(submit_segment(&mut e, &mem, T_WRITE_ZEROES, 16, 8), S_OK);
    assert_eq!(submit_segment(&mut e, &mem, T_DISCARD, 16, 8), S_OK);
    assert_eq!(submit(&mut e, &mem, T_GET_ID, 0, Some((20, true))), S_OK);
    let s = stats(&be);
    assert_eq!((s.rd_operations, s.rd_bytes), (1, 1024));
    assert_eq!((s.wr_operations, s.wr_bytes), (2, 4096 + 8 * 512));
    assert_eq!(s.flush_operations, 1);
    assert_eq!(
        (
            s.failed_rd_operations,
            s.failed_wr_operations,
            s.failed_flush_operations
        ),
        (0, 0, 0)
    );
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Ok));
}

#[test]
fn requests_refused_before_any_io_count_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk_filled(dir.path(), 0);
    let mut e = BlkEngine::new(be.clone(), false, "x");
    let mem = mem();
    // Reads: beyond the disk, not whole sectors.
    assert_eq!(
        submit(&mut e, &mem, T_IN, 2047, Some((1024, true))),
        S_IOERR
    );
    assert_eq!(submit(&mut e, &mem, T_IN, 0, Some((100, true))), S_IOERR);
    // Writes: beyond the disk; write-zeroes beyond the disk; a discard
    // beyond the disk fails too but has no counter.
    assert_eq!(
        submit(&mut e, &mem, T_OUT, u64::MAX, Some((512, false))),
        S_IOERR
    );
    assert_eq!(
        submit_segment(&mut e, &mem, T_WRITE_ZEROES, 2040, 16),
        S_IOERR
    );
    assert_eq!(submit_segment(&mut e, &mem, T_DISCARD, 2040, 16), S_IOERR);
    // Writes of any kind on a read-only disk.
    let mut ro = BlkEngine::new(be.clone(), true, "x");
    assert_eq!(submit(&mut ro, &mem, T_OUT, 0, Some((512, false))), S_IOERR);
    assert_eq!(submit_segment(&mut ro, &mem, T_WRITE_ZEROES, 0, 8), S_IOERR);
    let s = stats(&be);
    assert_eq!((s.invalid_rd_operations, s.invalid_wr_operations), (2, 4));
    assert_eq!(s.invalid_flush_operations, 0);
    assert_eq!((s.rd_operations, s.wr_operations), (0, 0));
    assert_eq!((s.failed_rd_operations, s.failed_wr_operations), (0, 0));
}

#[test]
fn report_fails_the_request_and_counts_it_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    for (event, kind, data) in [
        ("write_aio", T_OUT, Some((4096, false))),
        ("read_aio", T_IN, Some((4096, true))),
        ("flush_to_disk", T_FLUSH, None),
    ] {
        let (g, be) = failing_disk(
            dir.path(),
            event,
            libc::EIO,
            BlockdevOnError::Report,
            BlockdevOnError::Report,
        );
        let mut e = BlkEngine::new(be.clone(), false, "x");
        let mem = mem();
        assert_eq!(submit(&mut e, &mem, kind, 8, data), S_IOERR, "{event}");
        assert_eq!(io_error_actions(&g), ["report"], "{event}");
        let s = stats(&be);
        let failed = (
            s.failed_rd_operations,
            s.failed_wr_operations,
            s.failed_flush_operations,
        );
        let expected = match kind {
            T_IN => (1, 0, 0),
            T_OUT => (0, 1, 0),
            _ => (0, 0, 1),
        };
        assert_eq!(failed, expected, "{event}");
        assert_eq!(
            s.rd_operations + s.wr_operations + s.flush_operations,
            0,
            "{event}"
        );
        // Report leaves the I/O status alone; the rule fired once: the same
        // request now succeeds.
        assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Ok));
        assert_eq!(submit(&mut e, &mem, kind, 8, data), S_OK, "{event}");
        assert!(e.take_held().is_empty());
    }
}

#[test]
fn ignore_completes_the_request_as_successful() {
    let (dir, g, be, mut e) = failing_engine(
        "write_aio",
        libc::EIO,
        BlockdevOnError::Ignore,
        BlockdevOnError::Report,
    );
    let mem = mem();
    mem.write_slice(&[0x77; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(submit(&mut e, &mem, T_OUT, 8, Some((4096, false))), S_OK);
    assert_eq!(io_error_actions(&g), ["ignore"]);
    let s = stats(&be);
    assert_eq!((s.wr_operations, s.failed_wr_operations), (1, 0));
    // Nothing reached the disk: the guest was told otherwise, as in QEMU.
    let on_disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert_eq!(&on_disk[8 * 512..8 * 512 + 4096], &[0u8; 4096][..]);
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Ok));
}

#[test]
fn failed_write_zeroes_follow_werror_and_ignored_reads_count_as_done() {
    let (_dir, g, be, mut e) = failing_engine(
        "pwritev_zero",
        libc::EIO,
        BlockdevOnError::Report,
        BlockdevOnError::Ignore,
    );
    let mem = mem();
    assert_eq!(submit_segment(&mut e, &mem, T_WRITE_ZEROES, 16, 8), S_IOERR);
    assert_eq!(io_error_actions(&g), ["report"]);
    let s = stats(&be);
    assert_eq!((s.wr_operations, s.failed_wr_operations), (0, 1));

    let (_dir, g, be, mut e) = failing_engine(
        "read_aio",
        libc::EIO,
        BlockdevOnError::Report,
        BlockdevOnError::Ignore,
    );
    assert_eq!(submit(&mut e, &mem, T_IN, 8, Some((4096, true))), S_OK);
    assert_eq!(io_error_actions(&g), ["ignore"]);
    let s = stats(&be);
    assert_eq!((s.rd_operations, s.rd_bytes), (1, 4096));
    assert_eq!(s.failed_rd_operations, 0);
}

/// A queue with a 4 KiB write of 0x5a at sector 8 (head 0) and a 4 KiB
/// read of sector 8 (head 3), whose status bytes are at STATUS and
/// STATUS + 1.
fn write_then_read(mem: &GuestMemoryMmap) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
    header(mem, T_OUT, 8);
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&8u64.to_le_bytes()); // T_IN is 0
    mem.write_slice(&h, GuestAddress(HDR + 16)).unwrap();
    mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA + 4096))
        .unwrap();
    mem.write_slice(&[0xff, 0xff], GuestAddress(STATUS))
        .unwrap();
    let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
    mock.add_desc_chains(
        &[
            desc(HDR, 16, NEXT, 1),
            desc(DATA, 4096, NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
            desc(HDR + 16, 16, NEXT, 4),
            desc(DATA + 4096, 4096, NEXT | WRITE, 5),
            desc(STATUS + 1, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let q: Queue = mock.create_queue().unwrap();
    (mock, q)
}

fn status_bytes(mem: &GuestMemoryMmap) -> [u8; 2] {
    let mut s = [0u8; 2];
    mem.read_slice(&mut s, GuestAddress(STATUS)).unwrap();
    s
}

#[test]
fn stop_keeps_the_request_and_its_queue_until_the_retry_which_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (g, be) = failing_disk(
        dir.path(),
        "write_aio",
        libc::EIO,
        BlockdevOnError::Stop,
        BlockdevOnError::Report,
    );
    let woken = Arc::new(AtomicBool::new(false));
    let w = woken.clone();
    let stop = IoErrorStop::new(Some(Box::new(move || w.store(true, Ordering::SeqCst))));
    let mut e = BlkEngine::new(be.clone(), false, "x");
    e.set_io_error_stop(stop.clone());
    let mem = mem();
    let (mock, mut q) = write_then_read(&mem);

    // The write fails: nothing completes, the VMM is asked to stop.
    assert_eq!(e.serve(0, &mut q, &mem), Served::Idle);
    assert!(woken.load(Ordering::SeqCst));
    assert!(stop.take());
    assert!(!stop.take(), "one request, taken once");
    assert!(e.is_held(0));
    assert_eq!(status_bytes(&mem), [0xff, 0xff]);
    assert_eq!(mock.used().idx().load(), 0);
    assert_eq!(io_error_actions(&g), ["stop"]);
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Failed));
    let s = stats(&be);
    assert_eq!(
        (s.wr_operations, s.failed_wr_operations, s.rd_operations),
        (0, 0, 0),
        "a kept request is accounted when it completes"
    );

    // The queue is left alone while it holds the request, whatever the guest does.
    assert_eq!(e.serve(0, &mut q, &mem), Served::Idle);
    assert_eq!(mock.used().idx().load(), 0);

    // The retry (the VM resumed) runs the kept write, then the read after it.
    assert_eq!(e.take_held(), [0]);
    assert!(e.take_held().is_empty());
    assert_eq!(e.serve(0, &mut q, &mem), Served::Interrupt);
    assert_eq!(status_bytes(&mem), [S_OK, S_OK]);
    assert_eq!(mock.used().idx().load(), 2);
    let mut back = [0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA + 4096))
        .unwrap();
    assert_eq!(back, [0x5a; 4096]);
    let on_disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert_eq!(&on_disk[8 * 512..8 * 512 + 4096], &[0x5a; 4096][..]);
    let s = stats(&be);
    assert_eq!((s.wr_operations, s.wr_bytes), (1, 4096));
    assert_eq!((s.rd_operations, s.failed_wr_operations), (1, 0));
    assert!(!stop.take());
    assert!(io_error_actions(&g).is_empty());
}

#[test]
fn enospc_stops_by_default_and_a_read_error_stops_with_rerror_stop() {
    let dir = tempfile::tempdir().unwrap();
    // werror's default is enospc: ENOSPC stops, with io-status nospace.
    let (g, be) = failing_disk(
        dir.path(),
        "write_aio",
        libc::ENOSPC,
        BackendOptions::default().werror,
        BlockdevOnError::Report,
    );
    let mut e = BlkEngine::new(be.clone(), false, "x");
    let mem = mem();
    let (_mock, mut q) = write_then_read(&mem);
    assert_eq!(e.process(&mut q, &mem).unwrap(), 0);
    assert!(e.is_held(0));
    assert_eq!(io_error_actions(&g), ["stop"]);
    assert_eq!(be.iostatus(), Some(BlockDeviceIoStatus::Nospace));

    let (_dir, g, be, mut e) = failing_engine(
        "read_aio",
        libc::EIO,
        BlockdevOnError::Report,
        BlockdevOnError::Stop,
    );
    let mem = super::tests::mem(); // `mem` is shadowed here
    let (mock, mut q) = write_then_read(&mem);
    // The write completes, the read after it is kept.
    assert_eq!(e.process(&mut q, &mem).unwrap(), 1);
    assert_eq!(status_bytes(&mem), [S_OK, 0xff]);
    assert!(e.is_held(0));
    assert_eq!(io_error_actions(&g), ["stop"]);
    assert_eq!(e.take_held(), [0]);
    assert_eq!(e.process(&mut q, &mem).unwrap(), 1);
    assert_eq!(status_bytes(&mem), [S_OK, S_OK]);
    assert_eq!(mock.used().idx().load(), 2);
    let s = stats(&be);
    assert_eq!((s.rd_operations, s.failed_rd_operations), (1, 0));
}

#[test]
fn a_request_failing_again_on_retry_is_kept_again_and_reset_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    // A rule that fails every write (not once).
    let rule = serde_json::json!({"event": "write_aio", "errno": libc::EIO});
    let (g, be) = disk_with_rule(
        dir.path(),
        rule,
        BlockdevOnError::Stop,
        BlockdevOnError::Report,
    );
    let stop = IoErrorStop::new(None);
    let mut e = BlkEngine::new(be.clone(), false, "x");
    e.set_io_error_stop(stop.clone());
    let mem = mem();
    let (mock, mut q) = write_then_read(&mem);
    for _ in 0..3 {
        assert_eq!(e.serve(0, &mut q, &mem), Served::Idle);
        assert!(stop.take());
        assert_eq!(e.take_held(), [0]);
    }
    assert_eq!(e.serve(0, &mut q, &mem), Served::Idle);
    assert_eq!(io_error_actions(&g), ["stop"; 4]);
    assert_eq!(mock.used().idx().load(), 0);
    // A device reset drops the kept request with the queue.
    e.reset();
    assert!(!e.is_held(0));
    assert!(e.take_held().is_empty());
}
