//! Many writers and readers at once, on shared clusters, with and without a backing file, with
//! a tiny cache (evictions) and with subclusters: the image must stay consistent for
//! `qemu-img check` and equal to a raw reference (the allocator must never hand out a live
//! cluster, COW from the backing file must not overwrite a neighbour's data).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use qcow2::{CreateOptions, FollowFiles, OpenOptions, Qcow2};

const SIZE: u64 = 8 << 20;
const STRIPE: u64 = 4096;
const THREADS: u64 = 4;

fn hammer(opts: CreateOptions, backing: bool, l2_cache: Option<u64>) {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = p(dir.path(), "c.qcow2");
    let mut reference = vec![0u8; SIZE as usize];
    if backing {
        let base = p(dir.path(), "base.raw");
        let mut rng = Rng(5);
        rng.fill(&mut reference);
        std::fs::write(&base, &reference).unwrap();
        Qcow2::create_path(
            &path,
            &CreateOptions {
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                ..opts
            },
        )
        .unwrap();
    } else {
        Qcow2::create_path(&path, &opts).unwrap();
    }
    let img = Arc::new(
        Qcow2::open_path(
            &path,
            OpenOptions {
                writable: true,
                l2_cache_size: l2_cache,
                refcount_cache_size: l2_cache,
                opener: Arc::new(FollowFiles::default()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let reference = Arc::new(Mutex::new(reference));
    let stripes = SIZE / STRIPE;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let img = img.clone();
            let reference = reference.clone();
            s.spawn(move || {
                let mut rng = Rng(t * 1000 + 17);
                // Thread t owns the stripes i with i % THREADS == t: neighbours in the same
                // cluster belong to other threads, so allocation and COW race constantly.
                for n in 0..300 {
                    let i = rng.below(stripes / THREADS) * THREADS + t;
                    let off = i * STRIPE;
                    let len = 512 * (1 + rng.below(STRIPE / 512));
                    let start = off + rng.below((STRIPE - len) / 512 + 1) * 512;
                    let mut buf = vec![0u8; len as usize];
                    rng.fill(&mut buf);
                    match rng.below(6) {
                        0 => {
                            img.write_zeroes(start, len, true).unwrap();
                            buf.fill(0);
                        }
                        1 => {
                            // Read back a stripe we own and check it.
                            let mut got = vec![0u8; STRIPE as usize];
                            img.read_at(&mut got, off).unwrap();
                            let r = reference.lock().unwrap();
                            assert!(
                                got[..] == r[off as usize..(off + STRIPE) as usize],
                                "thread {t} op {n}: stripe {i} differs"
                            );
                            continue;
                        }
                        _ => img.write_at(&buf, start).unwrap(),
                    }
                    reference.lock().unwrap()[start as usize..(start + len) as usize]
                        .copy_from_slice(&buf);
                    if n % 97 == 0 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
    img.flush().unwrap();
    drop(img);
    let raw = p(dir.path(), "ref.raw");
    std::fs::write(&raw, &*reference.lock().unwrap()).unwrap();
    assert_clean(&path, false);
    assert_same(&path, "qcow2", &raw, "raw");
}

#[test]
fn concurrent_writers_default_clusters() {
    hammer(CreateOptions::new(SIZE), false, None);
}

#[test]
fn concurrent_writers_backing_file() {
    hammer(CreateOptions::new(SIZE), true, None);
}

#[test]
fn concurrent_writers_small_clusters_tiny_cache() {
    hammer(
        CreateOptions {
            cluster_size: 1024,
            ..CreateOptions::new(SIZE)
        },
        true,
        Some(2048),
    );
}

#[test]
fn concurrent_writers_subclusters_backing() {
    hammer(
        CreateOptions {
            cluster_size: 131072,
            extended_l2: true,
            ..CreateOptions::new(SIZE)
        },
        true,
        None,
    );
}

/// Readers on the lock-free path (tables remembered per thread) while a writer discards
/// clusters, gets their host clusters freed and reused by other guest clusters, and rewrites
/// them, with a two-table L2 cache that evicts all the time: a reader must only ever see a
/// block's own pattern or zeros (never the data of the cluster that reused its host cluster).
#[test]
fn lock_free_readers_never_see_reused_clusters() {
    let file: Arc<dyn qcow2::Storage> = Arc::new(qcow2::MemStorage::new());
    let cs = 4096u64;
    Qcow2::create(
        file.clone(),
        &CreateOptions {
            cluster_size: cs,
            ..CreateOptions::new(16 << 20)
        },
    )
    .unwrap();
    let img = Arc::new(
        Qcow2::open(
            file,
            OpenOptions {
                writable: true,
                l2_cache_size: Some(2 * cs),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    // Blocks 0..N in the first table, and "other" blocks spread over later tables (each L2
    // table covers 2 MiB with 4 KiB clusters).
    const N: u64 = 16;
    let pat = |b: u64| vec![(b % 250 + 1) as u8; cs as usize];
    for b in 0..N {
        img.write_at(&pat(b), b * cs).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (img, stop) = (img.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; cs as usize];
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let b = (n * 7 + r) % N;
                    img.read_at(&mut buf, b * cs).unwrap();
                    let want = (b % 250 + 1) as u8;
                    assert!(
                        buf.iter().all(|&x| x == want) || buf.iter().all(|&x| x == 0),
                        "block {b}: saw {} (want {want} or 0)",
                        buf[0]
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    let mut round = 0u64;
    while std::time::Instant::now() < deadline {
        let b = round % N;
        // Drop the block's cluster, apply the free, let another guest cluster take it.
        img.discard(b * cs, cs).unwrap();
        img.flush().unwrap();
        // Two other tables: the block's table is evicted and reloaded as a new object.
        for k in [1 + round % 3, 4 + round % 3] {
            let other = k * (2 << 20) + (round % 32) * cs;
            img.write_at(&vec![251u8; cs as usize], other).unwrap();
            img.discard(other, cs).unwrap();
        }
        img.write_at(&pat(b), b * cs).unwrap();
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(reads > 0 && round > 0);
    let r = img.check(qcow2::check::Fix::NONE).unwrap();
    assert_eq!(r.corruptions, 0);
}

/// A storage whose reads of whole clusters at chosen offsets take a while (a slow disk).
struct SlowTables {
    inner: qcow2::MemStorage,
    slow: Mutex<Vec<u64>>,
    cluster: usize,
}

impl qcow2::Storage for SlowTables {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if buf.len() == self.cluster && self.slow.lock().unwrap().contains(&offset) {
            std::thread::sleep(std::time::Duration::from_millis(600));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// A lookup that misses the L2 cache reads the table without holding the metadata lock:
/// while one thread waits for a slow table read, another thread's lookups in cached tables
/// (on the locked path: its own per-thread tables are cold) complete.
#[test]
fn cache_misses_do_not_block_hits() {
    let cs = 4096u64;
    let st = Arc::new(SlowTables {
        inner: qcow2::MemStorage::new(),
        slow: Mutex::new(Vec::new()),
        cluster: cs as usize,
    });
    let file: Arc<dyn qcow2::Storage> = st.clone();
    Qcow2::create(
        file.clone(),
        &CreateOptions {
            cluster_size: cs,
            ..CreateOptions::new(16 << 20)
        },
    )
    .unwrap();
    {
        let img = Qcow2::open(
            file.clone(),
            OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        // Data in the first table (0..2 MiB) and in the fourth (6..8 MiB).
        img.write_at(&[1u8; 4096], 0).unwrap();
        img.write_at(&[4u8; 4096], 6 << 20).unwrap();
        img.close().unwrap();
    }
    let img = Arc::new(Qcow2::open(file, OpenOptions::default()).unwrap());
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b[0], 1);
    // The fourth table is not cached yet: make reading it slow.
    let l1 = {
        let h = img.header();
        let mut raw = [0u8; 32];
        img.file().read_at(&mut raw, h.l1_table_offset).unwrap();
        u64::from_be_bytes(raw[24..32].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
    };
    assert_ne!(l1, 0);
    st.slow.lock().unwrap().push(l1);
    let slow = {
        let img = img.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            img.read_at(&mut b, 6 << 20).unwrap();
            b[0]
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    // A fresh thread (no remembered tables) looks up the cached first table.
    let fast = {
        let img = img.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let mut b = [0u8; 4096];
            for i in 0..16 {
                img.read_at(&mut b, (i % 4) * 4096).unwrap();
            }
            (t.elapsed(), b[0])
        })
    };
    let (took, first) = fast.join().unwrap();
    assert_eq!(first, 0);
    assert!(
        took < std::time::Duration::from_millis(300),
        "lookups in a cached table waited {took:?} for another thread's table read"
    );
    assert_eq!(slow.join().unwrap(), 4);
}
