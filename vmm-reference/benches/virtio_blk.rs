//! virtio-blk request handling cost in the VMM: requests per second through
//! the device's engine (virtqueue parsing, bounds checks, the BlockBackend,
//! completion) from a synthetic queue driver, without a guest in the way.
//!
//! `cargo bench -p vmm-reference --bench virtio_blk` prints, for 4 KiB reads
//! and writes in batches of 64 requests per notification, the median of
//! several runs on a null-co node (the engine's own cost) and on a raw file
//! in the page cache (the whole path).

#[allow(dead_code)]
#[path = "../src/devices/virtio_blk.rs"]
mod virtio_blk;

use std::sync::Arc;
use std::time::Instant;

use block_graph::{BlockGraph, DeviceAttach};
use qapi_types::{BlockdevOptions, QapiType};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use virtio_blk::BlkEngine;

const BATCH: u16 = 64;
const ROUNDS: usize = 400;

fn backend(g: &mut BlockGraph, opts: serde_json::Value) -> Arc<block_graph::BlockBackend> {
    let node = g
        .blockdev_add(&BlockdevOptions::from_qmp_strict(opts).expect("options"))
        .expect("node");
    let be = g
        .create_backend("vd0", Some(&node), Default::default())
        .expect("backend");
    g.attach_device(&be, DeviceAttach::disk("vd0"))
        .expect("attach");
    be
}

/// Requests per second for `kind` (0 read, 1 write), median of 5 runs.
fn measure(engine: &mut BlkEngine, kind: u32) -> f64 {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let mut total = 0usize;
        let start = Instant::now();
        for round in 0..ROUNDS {
            // A fresh queue each round: BATCH chains of header, 4 KiB, status.
            let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 256);
            let mut descs = Vec::new();
            for r in 0..u64::from(BATCH) {
                let hdr = 0x10_0000 + r * 64;
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                let sector = ((round as u64 * u64::from(BATCH) + r) % 2048) * 8;
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&h, GuestAddress(hdr)).unwrap();
                let i = (r * 3) as u16;
                let data_flags = if kind == 0 { 1 | 2 } else { 1 };
                descs.push(RawDescriptor::from(Descriptor::new(hdr, 16, 1, i + 1)));
                descs.push(RawDescriptor::from(Descriptor::new(
                    0x20_0000 + r * 4096,
                    4096,
                    data_flags,
                    i + 2,
                )));
                descs.push(RawDescriptor::from(Descriptor::new(hdr + 32, 1, 2, 0)));
            }
            mock.add_desc_chains(&descs, 0).unwrap();
            let mut q: Queue = mock.create_queue().unwrap();
            total += engine.process(&mut q, &mem).unwrap();
        }
        runs.push(total as f64 / start.elapsed().as_secs_f64());
    }
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    runs[runs.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
    // Read the file once so the page cache holds it before timing.
    let _ = std::fs::read(&raw).unwrap();

    let mut g = BlockGraph::new();
    let null = backend(
        &mut g,
        serde_json::json!({"driver": "null-co", "node-name": "n", "size": 8 << 20, "read-zeroes": true}),
    );
    let mut e = BlkEngine::new(null, false, "bench");
    let (nr, nw) = (measure(&mut e, 0), measure(&mut e, 1));

    let mut g2 = BlockGraph::new();
    let file = backend(
        &mut g2,
        serde_json::json!({"driver": "file", "node-name": "f", "filename": raw.to_str().unwrap()}),
    );
    let mut e2 = BlkEngine::new(file, false, "bench");
    let (fr, fw) = (measure(&mut e2, 0), measure(&mut e2, 1));

    println!("virtio-blk requests/s, 4 KiB, {BATCH} requests per notification (median of 5):");
    println!("  null-co   read {nr:>10.0}   write {nw:>10.0}   (the engine's own cost)");
    println!("  raw file  read {fr:>10.0}   write {fw:>10.0}   (page cache, the whole path)");
}
