//! What a block layer needs around the format: reopening read-only and read-write, freed
//! clusters reported and passed down as discards (QEMU's pass-discard-*), and blkdebug events
//! raised before the image-file I/O they name.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2::header::INCOMPAT_DIRTY;
use qcow2::{
    CreateOptions, DebugEvent, DiscardPassing, FreeReason, FreedRange, Header, MemStorage,
    OpenOptions, Qcow2, Storage,
};

/// A [`MemStorage`] that records discards and can fail its next I/O (like blkdebug's
/// `inject-error` with `once=on`, armed by an event).
#[derive(Default)]
struct Probe {
    inner: MemStorage,
    discards: Mutex<Vec<(u64, u64)>>,
    fail_next: AtomicBool,
}

impl Probe {
    fn injected(&self) -> io::Result<()> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for Probe {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.injected()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.injected()?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discards.lock().unwrap().push((offset, len));
        // Like a punched hole: whatever was there is gone.
        self.inner.write_zeroes(offset, len)
    }
}

const CS: u64 = 65536;

fn new_image(lazy: bool) -> Arc<Probe> {
    let p = Arc::new(Probe::default());
    let mut o = CreateOptions::new(64 << 20);
    o.lazy_refcounts = lazy;
    Qcow2::create(p.clone(), &o).unwrap();
    p
}

fn open_rw(p: &Arc<Probe>) -> Qcow2 {
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    Qcow2::open(p.clone(), opts).unwrap()
}

fn file_header(p: &Probe) -> Header {
    let v = p.inner.to_vec();
    Header::parse(&v[..CS as usize], v.len() as u64).unwrap()
}

#[test]
fn reopen_read_only_writes_everything_and_read_write_again() {
    let p = new_image(true);
    let img = open_rw(&p);
    img.write_at(&[1u8; 4096], 0).unwrap();
    // Lazy refcounts: the first allocation set the dirty bit.
    assert_ne!(file_header(&p).incompatible_features & INCOMPAT_DIRTY, 0);
    img.reopen_read_only().unwrap();
    assert!(img.is_read_only());
    assert!(matches!(
        img.write_at(&[2u8; 512], 0),
        Err(qcow2::Error::ReadOnly)
    ));
    // Clean on disk: no dirty bit, and another reader sees the data and no leaks.
    assert_eq!(file_header(&p).incompatible_features & INCOMPAT_DIRTY, 0);
    let other = Qcow2::open(
        Arc::new(MemStorage::from_vec(p.inner.to_vec())),
        OpenOptions::default(),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    other.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1u8; 4096]);
    let c = other.check(qcow2::check::Fix::NONE).unwrap();
    assert_eq!((c.corruptions, c.leaks), (0, 0));
    // Reads go on while read-only; a second reopen read-only is a no-op.
    img.read_at(&mut buf, 0).unwrap();
    img.reopen_read_only().unwrap();
    img.reopen_read_write().unwrap();
    assert!(!img.is_read_only());
    img.write_at(&[3u8; 4096], CS).unwrap();
    img.close().unwrap();
    drop(img);
    let again = Qcow2::open(p, OpenOptions::default()).unwrap();
    again.read_at(&mut buf, CS).unwrap();
    assert_eq!(buf, [3u8; 4096]);
    assert_eq!(again.check(qcow2::check::Fix::NONE).unwrap().leaks, 0);
}

fn open_with_freed(p: &Arc<Probe>, pass: DiscardPassing) -> (Qcow2, Arc<Mutex<Vec<FreedRange>>>) {
    let freed = Arc::new(Mutex::new(Vec::new()));
    let f = freed.clone();
    let img = Qcow2::open(
        p.clone(),
        OpenOptions {
            writable: true,
            discard_passing: pass,
            on_freed: Some(Arc::new(move |r: &FreedRange| f.lock().unwrap().push(*r))),
            ..Default::default()
        },
    )
    .unwrap();
    (img, freed)
}

fn host_of(img: &Qcow2, guest: u64) -> u64 {
    match img.map(guest, 1).unwrap().kind {
        qcow2::MappingKind::Data { host_offset } => host_offset,
        k => panic!("not data: {k:?}"),
    }
}

#[test]
fn guest_discards_are_passed_down_only_with_pass_discard_request() {
    for request in [false, true] {
        let p = new_image(false);
        let (img, freed) = open_with_freed(
            &p,
            DiscardPassing {
                request,
                ..DiscardPassing::default()
            },
        );
        img.write_at(&vec![7u8; 2 * CS as usize], 0).unwrap();
        let host = host_of(&img, CS);
        img.discard(CS, CS).unwrap();
        img.flush().unwrap();
        let want = FreedRange {
            offset: host,
            len: CS,
            reason: FreeReason::Request,
        };
        assert_eq!(*freed.lock().unwrap(), vec![want], "request={request}");
        let discards = p.discards.lock().unwrap().clone();
        if request {
            assert_eq!(discards, vec![(host, CS)]);
        } else {
            assert!(discards.is_empty(), "{discards:?}");
        }
        // The freed cluster is reused by the next allocation, and its data is right.
        img.write_at(&vec![9u8; CS as usize], 10 * CS).unwrap();
        assert_eq!(host_of(&img, 10 * CS), host);
        let mut buf = vec![0u8; CS as usize];
        img.read_at(&mut buf, 10 * CS).unwrap();
        assert!(buf.iter().all(|&b| b == 9));
    }
}

#[test]
fn snapshot_deletion_discards_by_default_and_other_frees_do_not() {
    let p = new_image(false);
    let (img, freed) = open_with_freed(&p, DiscardPassing::default());
    img.write_at(&vec![1u8; CS as usize], 0).unwrap();
    let old_host = host_of(&img, 0);
    img.snapshot_create("s1").unwrap();
    // Copy-on-write of a shared cluster frees nothing (the snapshot still holds it).
    img.write_at(&vec![2u8; CS as usize], 0).unwrap();
    img.flush().unwrap();
    assert!(freed
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.reason != FreeReason::Request));
    let before = p.discards.lock().unwrap().len();
    img.snapshot_delete("s1").unwrap();
    let f = freed.lock().unwrap().clone();
    let snap: Vec<_> = f
        .iter()
        .filter(|r| r.reason == FreeReason::Snapshot)
        .collect();
    assert!(
        snap.iter()
            .any(|r| r.offset <= old_host && old_host < r.offset + r.len),
        "old data cluster {old_host:#x} not freed as a snapshot free: {f:?}"
    );
    let d = p.discards.lock().unwrap()[before..].to_vec();
    for r in &snap {
        assert!(d.contains(&(r.offset, r.len)), "{r:?} not discarded: {d:?}");
    }
    // Frees of type "other" (the old snapshot table, moved L2 tables) stay in the file.
    for r in f.iter().filter(|r| r.reason == FreeReason::Other) {
        assert!(!d.contains(&(r.offset, r.len)), "{r:?} discarded");
    }
    let c = img.check(qcow2::check::Fix::NONE).unwrap();
    assert_eq!((c.corruptions, c.leaks), (0, 0));
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

fn open_with_events(
    p: &Arc<Probe>,
    fail_on: Option<DebugEvent>,
) -> (Qcow2, Arc<Mutex<Vec<DebugEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let probe = p.clone();
    // Armed once, like blkdebug's `once=on`.
    let armed = AtomicBool::new(true);
    let img = Qcow2::open(
        p.clone(),
        OpenOptions {
            writable: true,
            on_debug_event: Some(Arc::new(move |e: DebugEvent| {
                ev.lock().unwrap().push(e);
                if Some(e) == fail_on && armed.swap(false, Ordering::SeqCst) {
                    probe.fail_next.store(true, Ordering::SeqCst);
                }
            })),
            ..Default::default()
        },
    )
    .unwrap();
    (img, events)
}

fn position(events: &[DebugEvent], e: DebugEvent) -> usize {
    events
        .iter()
        .position(|&x| x == e)
        .unwrap_or_else(|| panic!("{} not raised: {events:?}", e.name()))
}

#[test]
fn debug_events_come_before_the_io_they_name() {
    let p = new_image(false);
    let (img, events) = open_with_events(&p, None);
    assert_eq!(events.lock().unwrap()[0], DebugEvent::ReftableLoad);
    events.lock().unwrap().clear();
    // A first write: refcount block load, cluster allocation, a new L2 table and its L1
    // entry, then the guest data.
    img.write_at(&[5u8; 4096], 3 * CS).unwrap();
    let ev = events.lock().unwrap().clone();
    let alloc = position(&ev, DebugEvent::ClusterAlloc);
    let l2w = position(&ev, DebugEvent::L2AllocWrite);
    let l1 = position(&ev, DebugEvent::L1Update);
    assert!(alloc < l2w && l2w < l1, "{ev:?}");
    assert!(position(&ev, DebugEvent::WriteAio) > l1, "{ev:?}");
    events.lock().unwrap().clear();
    img.flush().unwrap();
    let ev = events.lock().unwrap().clone();
    position(&ev, DebugEvent::L2Update);
    position(&ev, DebugEvent::RefblockUpdatePart);
    drop(img);
    // A fresh open: the first read loads the L2 table, then reads the data.
    let (img, events) = open_with_events(&p, None);
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 3 * CS).unwrap();
    assert_eq!(buf, [5u8; 4096]);
    let ev = events.lock().unwrap().clone();
    assert!(position(&ev, DebugEvent::L2Load) < position(&ev, DebugEvent::ReadAio));
    // Names are QEMU's.
    assert_eq!(
        DebugEvent::RefblockAllocSwitchTable.name(),
        "refblock_alloc_switch_table"
    );
}

#[test]
fn an_error_injected_on_l2_load_fails_that_read_and_only_that_one() {
    let p = new_image(false);
    {
        let img = open_rw(&p);
        img.write_at(&[6u8; 4096], 0).unwrap();
        img.close().unwrap();
    }
    let (img, _events) = open_with_events(&p, Some(DebugEvent::L2Load));
    let mut buf = [0u8; 4096];
    let err = img.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(err, qcow2::Error::Io(_)), "{err:?}");
    // An I/O error is not corruption; the next attempt loads the table.
    assert!(!img.is_corrupt());
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [6u8; 4096]);
}

#[test]
fn refcount_block_allocation_events_when_the_image_grows() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and
    // the first refcount table cluster 64 blocks, so a few MiB need new blocks and a larger
    // refcount table.
    let p = Arc::new(Probe::default());
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 512;
    o.refcount_bits = 64;
    Qcow2::create(p.clone(), &o).unwrap();
    let (img, events) = open_with_events(&p, None);
    // 3 MiB of data: more clusters than the first refcount table cluster covers (4096).
    for i in 0..48u64 {
        img.write_at(&[i as u8; 65536], i * 65536).unwrap();
    }
    img.flush().unwrap();
    let ev = events.lock().unwrap().clone();
    for e in [
        DebugEvent::RefblockAlloc,
        DebugEvent::RefblockAllocWrite,
        DebugEvent::RefblockAllocHookup,
        DebugEvent::ReftableGrow,
        DebugEvent::RefblockAllocWriteTable,
        DebugEvent::RefblockAllocSwitchTable,
    ] {
        position(&ev, e);
    }
    let c = img.check(qcow2::check::Fix::NONE).unwrap();
    assert_eq!((c.corruptions, c.leaks), (0, 0));
}

#[test]
fn clusters_freed_while_allocating_are_discarded_before_their_reuse() {
    // Growing the refcount table in the middle of allocations frees the old table (type
    // "other") and the allocator hands those clusters out again at once: with
    // pass-discard-other the discard must come before the new data, not after.
    let p = Arc::new(Probe::default());
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 512;
    o.refcount_bits = 64;
    Qcow2::create(p.clone(), &o).unwrap();
    let (img, freed) = open_with_freed(
        &p,
        DiscardPassing {
            request: true,
            snapshot: true,
            other: true,
        },
    );
    for i in 0..48u64 {
        img.write_at(&[i as u8 + 1; 65536], i * 65536).unwrap();
    }
    // Single-cluster allocations (a new L2 table and a data cluster each) right after.
    for k in 0..40u64 {
        img.write_at(&[0xa0 + k as u8; 512], (4 << 20) + k * 32768)
            .unwrap();
    }
    img.close().unwrap();
    drop(img);
    let reported = freed.lock().unwrap().clone();
    assert!(
        reported.iter().any(|r| r.reason == FreeReason::Other),
        "the old refcount table was not reported"
    );
    assert!(!p.discards.lock().unwrap().is_empty());
    // Read back from the file alone.
    let img = Qcow2::open(p.clone(), OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 65536];
    for i in 0..48u64 {
        img.read_at(&mut buf, i * 65536).unwrap();
        let ok = buf.iter().all(|&b| b == i as u8 + 1);
        assert!(ok, "block {i} lost its data");
    }
    for k in 0..40u64 {
        img.read_at(&mut buf[..512], (4 << 20) + k * 32768).unwrap();
        let ok = buf[..512].iter().all(|&b| b == 0xa0 + k as u8);
        assert!(ok, "write {k} lost its data");
    }
    let c = img.check(qcow2::check::Fix::NONE).unwrap();
    assert_eq!((c.corruptions, c.leaks), (0, 0));
}
