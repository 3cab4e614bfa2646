//! Unit tests of the virtio-blk request engine: requests built in a mock split queue
//! in guest memory, run on block-graph BlockBackends (shared with the error-policy tests).

use super::*;
use block_graph::BlockGraph;
use qapi_types::{BlockdevOptions, QapiType};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;
pub(crate) const HDR: u64 = 0x10_0000;
pub(crate) const DATA: u64 = 0x20_0000;
pub(crate) const STATUS: u64 = 0x30_0000;

fn disk(dir: &std::path::Path) -> (BlockGraph, Arc<BlockBackend>) {
    disk_filled(dir, 0)
}

/// A 1 MiB raw disk filled with `fill`, on a BlockBackend with a device.
pub(crate) fn disk_filled(dir: &std::path::Path, fill: u8) -> (BlockGraph, Arc<BlockBackend>) {
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![fill; 1 << 20]).unwrap();
    let mut g = BlockGraph::new();
    let opts = BlockdevOptions::from_qmp_strict(serde_json::json!({
        "driver": "file", "node-name": "d0", "filename": path.to_str().unwrap()
    }))
    .unwrap();
    let node = g.blockdev_add(&opts).unwrap();
    let be = g
        .create_backend("disk", Some(&node), Default::default())
        .unwrap();
    g.attach_device(&be, block_graph::DeviceAttach::disk("virtio-disk0"))
        .unwrap();
    (g, be)
}

pub(crate) fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

pub(crate) fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

pub(crate) fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Submits one request (header, optional data, status) and runs the engine.
pub(crate) fn submit(
    engine: &mut BlkEngine,
    mem: &GuestMemoryMmap,
    kind: u32,
    sector: u64,
    data: Option<(u32, bool)>,
) -> u8 {
    header(mem, kind, sector);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
    let mut descs = vec![desc(HDR, 16, NEXT, 1)];
    if let Some((len, device_writes)) = data {
        descs.push(desc(
            DATA,
            len,
            NEXT | if device_writes { WRITE } else { 0 },
            2,
        ));
    }
    descs.push(desc(STATUS, 1, WRITE, 0));
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert_eq!(engine.process(&mut q, mem).unwrap(), 1);
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn reads_writes_flushes_and_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk(dir.path());
    let mut e = BlkEngine::new(be, false, "serial-0123456789-abcdefgh");
    let mem = mem();
    assert_eq!(e.capacity(), 2048);
    mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(submit(&mut e, &mem, T_OUT, 8, Some((4096, false))), S_OK);
    mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(submit(&mut e, &mem, T_IN, 8, Some((4096, true))), S_OK);
    let mut back = [0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 4096]);
    let on_disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert_eq!(&on_disk[8 * 512..8 * 512 + 4096], &[0x5a; 4096][..]);
    assert_eq!(submit(&mut e, &mem, T_FLUSH, 0, None), S_OK);
    assert_eq!(submit(&mut e, &mem, T_GET_ID, 0, Some((20, true))), S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"serial-0123456789-ab");
    assert_eq!(submit(&mut e, &mem, 99, 0, None), S_UNSUPP);
}

#[test]
fn out_of_range_and_read_only_requests_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk(dir.path());
    let mut e = BlkEngine::new(be.clone(), false, "x");
    let mem = mem();
    assert_eq!(
        submit(&mut e, &mem, T_IN, 2047, Some((1024, true))),
        S_IOERR
    );
    assert_eq!(
        submit(&mut e, &mem, T_IN, u64::MAX, Some((512, true))),
        S_IOERR
    );
    assert_eq!(
        submit(&mut e, &mem, T_IN, 0, Some((100, true))),
        S_IOERR,
        "not whole sectors"
    );
    let mut ro = BlkEngine::new(be, true, "x");
    assert_eq!(submit(&mut ro, &mem, T_OUT, 0, Some((512, false))), S_IOERR);
    assert!(ro.features(1) & features::RO != 0);
}

#[test]
fn hostile_queues_break_the_device_not_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk(dir.path());
    let mut e = BlkEngine::new(be, false, "x");
    let mem = mem();
    header(&mem, T_IN, 0);

    for descs in [
        // Data outside guest memory.
        vec![
            desc(HDR, 16, NEXT, 1),
            desc(1 << 40, 4096, NEXT | WRITE, 2),
            desc(STATUS, 1, WRITE, 0),
        ],
        // A header shorter than 16 bytes.
        vec![desc(HDR, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)],
        // No status byte.
        vec![desc(HDR, 16, 0, 0)],
        // A loop: descriptor 1 points back to 0.
        vec![desc(HDR, 16, NEXT, 1), desc(DATA, 512, NEXT | WRITE, 0)],
        // A huge length.
        vec![
            desc(HDR, 16, NEXT, 1),
            desc(DATA, u32::MAX, NEXT | WRITE, 2),
            desc(STATUS, 1, WRITE, 0),
        ],
    ] {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        // Either the request fails (never reporting success where the driver
        // looks for its status) or the device reports it is broken.
        match e.process(&mut q, &mem) {
            Ok(_) => {
                let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
                assert_ne!(status, S_OK, "{descs:?}");
            }
            Err(QueueError::Broken(_)) => {}
        }
    }
}

#[test]
fn random_garbage_in_the_queue_never_panics_and_leaves_the_engine_usable() {
    // A guest writing garbage: random chains (addresses inside and far outside guest
    // memory, lengths up to u32::MAX, random flags including INDIRECT, random `next`
    // links) carrying random headers (every request type and unknown ones, sectors
    // up to u64::MAX) and random discard/write-zeroes segments. The engine must
    // answer or declare the queue broken, never panic, and serve a well-formed
    // request afterwards.
    let dir = tempfile::tempdir().unwrap();
    let (_g, be) = disk(dir.path());
    let mut e = BlkEngine::new(be, false, "x");
    let mem = mem();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let types = [
        T_IN,
        T_OUT,
        T_FLUSH,
        T_GET_ID,
        T_DISCARD,
        T_WRITE_ZEROES,
        7,
        u32::MAX,
    ];
    let addrs = [
        HDR,
        DATA,
        STATUS,
        0,
        0x7f_fff0,
        8 << 20,
        1 << 40,
        u64::MAX - 7,
    ];
    let lens = [0, 1, 15, 16, 512, 4096, 65536, 1 << 20, u32::MAX];
    for _ in 0..3000 {
        let kind = types[rnd() as usize % types.len()];
        let sector = match rnd() % 4 {
            0 => rnd() % 2048,
            1 => 2040 + rnd() % 16,
            2 => u64::MAX - rnd() % 4,
            _ => rnd(),
        };
        header(&mem, kind, sector);
        // Discard / write-zeroes segments and data: random bytes.
        let junk: Vec<u8> = (0..64).map(|_| rnd() as u8).collect();
        mem.write_slice(&junk, GuestAddress(DATA)).unwrap();
        let n = 1 + rnd() as usize % 6;
        let mut descs: Vec<RawDescriptor> = Vec::with_capacity(n + 2);
        // Most chains look like requests (header first, status last) so that the
        // garbage reaches the request handling; the rest are random throughout.
        let plausible = rnd() % 10 < 7;
        let mut well_linked = plausible;
        if plausible {
            descs.push(desc(HDR, 16, NEXT, 1));
        }
        for i in 0..n {
            let addr = if rnd() % 4 == 0 {
                rnd() % (16 << 20)
            } else {
                addrs[rnd() as usize % addrs.len()]
            };
            let len = lens[rnd() as usize % lens.len()];
            // A descriptor outside guest memory ends the chain where virtio-queue
            // stops walking it: the status byte is then elsewhere.
            if addr.saturating_add(u64::from(len)) > 8 << 20 {
                well_linked = false;
            }
            let (flags, next) = if plausible && rnd() % 8 != 0 {
                (
                    NEXT | if rnd() % 2 == 0 { WRITE } else { 0 },
                    (i + 2) as u16,
                )
            } else {
                well_linked = false;
                ((rnd() % 8) as u16, (rnd() % 20) as u16)
            };
            descs.push(desc(addr, len, flags, next));
        }
        if plausible {
            descs.push(desc(STATUS, 1, WRITE, 0));
        }
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        if mock.add_desc_chains(&descs, 0).is_err() {
            continue;
        }
        let mut q: Queue = mock.create_queue().unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        // Ok (requests answered) or a broken queue: both are answers; a panic is not.
        if let (Ok(1), true) = (e.process(&mut q, &mem), well_linked) {
            // The status byte is the chain's last byte: a valid status, and never
            // success for a request type the device does not know.
            let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
            assert!(
                [S_OK, S_IOERR, S_UNSUPP].contains(&status),
                "status {status} for type {kind} sector {sector}: {descs:?}"
            );
            if kind == 7 || kind == u32::MAX {
                assert_eq!(status, S_UNSUPP, "{descs:?}");
            }
        }
    }
    // The engine still serves a well-formed request.
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(submit(&mut e, &mem, T_OUT, 3, Some((512, false))), S_OK);
    mem.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(submit(&mut e, &mem, T_IN, 3, Some((512, true))), S_OK);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 512]);
}
