//! Heap allocations per write in the steady state, counted by a global allocator that only
//! this test binary uses: allocating writes (a new cluster each) and writes in place must not
//! allocate per request beyond a small fixed bound, whichever path they take (`write_at`, or
//! `prepare_write`/`commit_write` as an I/O engine drives it).
//!
//! The counter is per thread, so the test harness's other threads do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use qcow2::{CreateOptions, FileStorage, OpenOptions, Qcow2, Storage, WritePlan};

struct Counting;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = COUNT.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to the system allocator unchanged; the counter is a
// thread-local `Cell` with a const initialiser, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made on this thread by `f`.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = COUNT.with(|c| c.get());
    f();
    COUNT.with(|c| c.get()) - before
}

const MIB: u64 = 1 << 20;

/// A new writable image of `size` bytes with `cluster_size` clusters in `dir`.
fn image(dir: &std::path::Path, name: &str, size: u64, cluster_size: u64) -> Qcow2 {
    let path = dir.join(name);
    let opts = CreateOptions {
        cluster_size,
        ..CreateOptions::new(size)
    };
    Qcow2::create_path(&path, &opts).unwrap();
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, true, false).unwrap());
    Qcow2::open(
        st,
        OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Writes `n` requests of `len` bytes starting at guest `base`, `step` apart (modulo the
/// image size), through the
/// plan API (as `vmm-img bench` and VMM engines do) or `write_at`; returns the allocations.
fn run(img: &Qcow2, base: u64, step: u64, len: usize, n: u64, plans: bool) -> u64 {
    let buf = vec![0x5au8; len];
    allocations(|| {
        for i in 0..n {
            // In-place runs wrap around the image; allocating ones fit in it.
            let off = (base + i * step) % img.size();
            if plans {
                let plan = img.prepare_write(off, len as u64).unwrap();
                assert_eq!(plan.len, len as u64, "one plan covers the request");
                img.execute_plan(&plan, &buf).unwrap();
                img.commit_write(plan).unwrap();
            } else {
                img.write_at(&buf, off).unwrap();
            }
        }
    })
}

/// Steady-state allocations per request: the first requests (cache set-up) are not counted;
/// the counted ones cross L2 tables with 4 KiB clusters, whose creation is amortized.
fn per_request(img: &Qcow2, base: u64, step: u64, len: usize, plans: bool) -> f64 {
    const WARM: u64 = 16;
    const N: u64 = 1200;
    run(img, base, step, len, WARM, plans);
    let n = run(img, base + WARM * step, step, len, N, plans);
    n as f64 / N as f64
}

#[test]
fn allocating_writes_do_not_allocate_per_request() {
    let dir = tempfile::tempdir().unwrap();
    for plans in [true, false] {
        // 4 KiB writes each into a new 64 KiB cluster (the rest of the cluster reads as zero,
        // nothing to copy), and whole-cluster writes.
        for (cs, len) in [(65536u64, 4096usize), (65536, 65536), (4096, 4096)] {
            let img = image(
                dir.path(),
                &format!("a{plans}{cs}{len}.qcow2"),
                128 * MIB,
                cs,
            );
            let per = per_request(&img, 0, cs, len, plans);
            eprintln!("allocating, cluster {cs}, {len}-byte writes, plans {plans}: {per} allocations per write");
            // No allocation per request: what remains is new L2 tables (two allocations per
            // table of 512 or 8192 clusters).
            assert!(
                per < 0.05,
                "{per} allocations per allocating write ({len} bytes into {cs}-byte clusters, plans: {plans})"
            );
            img.close().unwrap();
        }
    }
}

#[test]
fn long_allocating_writes_allocate_once() {
    // 64 KiB writes into 4 KiB clusters: 16 entries per plan, more than a plan keeps inline.
    let dir = tempfile::tempdir().unwrap();
    for plans in [true, false] {
        let img = image(dir.path(), &format!("l{plans}.qcow2"), 128 * MIB, 4096);
        let per = per_request(&img, 0, 65536, 65536, plans);
        eprintln!("allocating, cluster 4096, 65536-byte writes, plans {plans}: {per} allocations per write");
        // One for the entries a plan cannot keep inline; the rest (about 0.3) is the new L2
        // table every 32 requests (a 4 KiB table maps 512 clusters), with its cache entry
        // and refcounts.
        assert!(
            per <= 1.5,
            "{per} allocations per 16-cluster allocating write"
        );
        img.close().unwrap();
    }
}

#[test]
fn plans_stay_small() {
    // Every write, in place too, moves its plan around by value.
    let n = std::mem::size_of::<WritePlan<'static>>();
    assert!(n <= 256, "a WritePlan takes {n} bytes");
}

#[test]
fn in_place_writes_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    for plans in [true, false] {
        for (cs, len) in [(65536u64, 4096usize), (65536, 65536)] {
            let img = image(
                dir.path(),
                &format!("p{plans}{cs}{len}.qcow2"),
                16 * MIB,
                cs,
            );
            // Allocate everything first.
            img.write_at(&vec![1u8; (16 * MIB) as usize], 0).unwrap();
            let per = per_request(&img, 0, len as u64, len, plans);
            eprintln!("in place, {len}-byte writes, plans {plans}: {per} allocations per write");
            assert!(
                per == 0.0,
                "{per} allocations per write in place ({len} bytes, plans: {plans})"
            );
            img.close().unwrap();
        }
    }
}
