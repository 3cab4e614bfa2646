//! Corrupt images: truncated files, entries pointing past the end or into metadata,
//! overlapping tables, absurd header fields, oversized tables. Every case ends in an error or
//! the corrupt-bit path, never a panic; plus a property test that mutates metadata bytes at
//! random and runs the whole API over the result.

mod common;

use std::sync::Arc;

use proptest::prelude::*;
use qcow2::check::Fix;
use qcow2::{CreateOptions, DirtyBitmap, MemStorage, OpenOptions, OverlapChecks, Qcow2, Storage};

fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A small image with every kind of metadata: L1/L2, refcounts, a compressed cluster, a
/// snapshot, a bitmap.
fn sample_image() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.clone(),
        &CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::new(1 << 20)
        },
    )
    .unwrap();
    {
        let img = Qcow2::open(
            st.clone(),
            OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_at(&vec![7u8; 100_000], 3000).unwrap();
        img.write_compressed(&vec![9u8; 4096], 8192 * 20).unwrap();
        img.snapshot_create("snap").unwrap();
        img.write_at(&vec![8u8; 5000], 50_000).unwrap();
        let mut bm = DirtyBitmap::new("bm", 65536, img.size());
        bm.set_range(0, 200_000);
        img.bitmap_store(&bm).unwrap();
        img.close().unwrap();
    }
    st.to_vec()
}

/// Runs the whole API over an image; only panics matter.
fn exercise(bytes: Vec<u8>) {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    for writable in [false, true] {
        let Ok(img) = Qcow2::open(
            st.clone(),
            OpenOptions {
                writable,
                l2_cache_size: Some(8192),
                ..Default::default()
            },
        ) else {
            continue;
        };
        let size = img.size().min(2 << 20);
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.block_status(off, n as u64);
            off += n as u64;
        }
        let _ = img.snapshots();
        for b in img.bitmap_list() {
            let _ = img.bitmap_read(&b.name);
        }
        let _ = img.info();
        if writable {
            let _ = img.write_at(&[1u8; 10_000], 1000.min(size.saturating_sub(10_000)));
            let _ = img.write_zeroes(0, 4096.min(size), false);
            let _ = img.discard(0, 8192.min(size));
            let _ = img.write_compressed(&[3u8; 4096], 0);
            let _ = img.flush();
            let _ = img.snapshot_apply("snap");
            let _ = img.check(Fix::ALL);
        } else {
            let _ = img.check(Fix::NONE);
        }
    }
}

#[test]
fn truncated_images() {
    let img = sample_image();
    for cut in [
        0usize,
        3,
        50,
        71,
        100,
        4095,
        4096,
        4104,
        8192,
        12000,
        16384,
        20000,
        img.len() - 1,
    ] {
        exercise(img[..cut.min(img.len())].to_vec());
    }
}

fn open_bytes(bytes: Vec<u8>, writable: bool) -> qcow2::Result<Qcow2> {
    Qcow2::open(
        Arc::new(MemStorage::from_vec(bytes)),
        OpenOptions {
            writable,
            ..Default::default()
        },
    )
}

#[test]
fn absurd_header_fields() {
    let good = sample_image();
    let patch = |off: usize, v: &[u8]| {
        let mut b = good.clone();
        b[off..off + v.len()].copy_from_slice(v);
        open_bytes(b, true).err().map(|e| e.to_string())
    };
    // l1_size enormous, refcount table clusters enormous, snapshot count enormous.
    assert!(patch(36, &u32::MAX.to_be_bytes()).is_some());
    assert!(patch(56, &u32::MAX.to_be_bytes()).is_some());
    assert!(patch(60, &65536u32.to_be_bytes()).is_some());
    assert!(patch(60, &u32::MAX.to_be_bytes()).is_some());
    // Table offsets past the end of the file, unaligned, overlapping.
    assert!(patch(40, &be64(1 << 50)).is_some());
    assert!(patch(40, &be64(4096 + 8)).is_some());
    let e = patch(40, &be64(4096)).unwrap();
    assert!(e.contains("overlaps"), "{e}");
    assert!(patch(48, &be64(0)).unwrap().contains("overlaps"));
    // Virtual size larger than the L1 table covers.
    assert!(patch(24, &be64(1 << 60)).is_some());
    // Cluster bits out of range.
    assert!(patch(20, &8u32.to_be_bytes()).is_some());
    assert!(patch(20, &30u32.to_be_bytes()).is_some());
    // Unknown incompatible bit.
    let e = patch(72, &be64(1 << 7)).unwrap();
    assert!(e.contains("Unknown incompatible feature: 80"), "{e}");
    // Header extension claiming more bytes than the cluster holds.
    let mut b = good.clone();
    let ext = 112;
    b[ext + 4..ext + 8].copy_from_slice(&0x7fff_0000u32.to_be_bytes());
    assert!(open_bytes(b, false).is_err());
}

/// Offsets of the active L1 table and of the refcount table in a sample image.
fn tables(b: &[u8]) -> (u64, u64) {
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
    (l1, rt)
}

#[test]
fn entries_pointing_past_the_end_or_into_metadata() {
    let good = sample_image();
    let (l1, rt) = tables(&good);
    let len = good.len() as u64;
    // L1 entry pointing past the end of the file: reads fail with the corrupt-bit path.
    let mut b = good.clone();
    b[l1 as usize..l1 as usize + 8].copy_from_slice(&be64((1 << 63) | (len + (1 << 20))));
    let img = open_bytes(b, true).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        img.read_at(&mut buf, 0),
        Err(qcow2::Error::CorruptionDetected(_))
    ));
    assert!(img.is_read_only() && img.is_corrupt());
    // L2 entry pointing into the L1 table: a write must not land there.
    let mut b = good.clone();
    let l2 = u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    b[l2 as usize..l2 as usize + 8].copy_from_slice(&be64((1 << 63) | l1));
    let st = Arc::new(MemStorage::from_vec(b));
    let img = Qcow2::open(
        st.clone(),
        OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        img.write_at(&[0xffu8; 512], 0),
        Err(qcow2::Error::CorruptionDetected(_))
    ));
    drop(img);
    let after = st.to_vec();
    assert_eq!(
        &after[l1 as usize + 8..l1 as usize + 64],
        &good[l1 as usize + 8..l1 as usize + 64]
    );
    // Refcount table entry past the end: allocation detects it instead of reusing clusters.
    let mut b = good.clone();
    b[rt as usize..rt as usize + 8].copy_from_slice(&be64(len + (1 << 20)));
    let img = open_bytes(b, true).unwrap();
    let r = img.write_at(&[1u8; 4096], 900_000);
    assert!(
        matches!(r, Err(qcow2::Error::CorruptionDetected(_))),
        "{r:?}"
    );
    // Refcount block claiming the header cluster is free.
    let mut b = good.clone();
    let rb = u64::from_be_bytes(b[rt as usize..rt as usize + 8].try_into().unwrap());
    let zeros = vec![0u8; 4096];
    b[rb as usize..rb as usize + 4096].copy_from_slice(&zeros);
    let img = open_bytes(b, true).unwrap();
    assert!(img.write_at(&[1u8; 4096], 900_000).is_err());
}

/// QEMU's `overlap-check` modes: the entry of guest cluster 0 is pointed at `target` and a
/// write to it is tried with `checks`; returns whether it was refused.
fn write_into_metadata(target: fn(l1: u64, l2: u64) -> u64, checks: OverlapChecks) -> bool {
    let mut b = sample_image();
    let (l1, _) = tables(&b);
    let l2 = u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    b[l2 as usize..l2 as usize + 8].copy_from_slice(&be64((1 << 63) | target(l1, l2)));
    let img = Qcow2::open(
        Arc::new(MemStorage::from_vec(b)),
        OpenOptions {
            writable: true,
            overlap_check: checks,
            ..Default::default()
        },
    )
    .unwrap();
    match img.write_at(&[0xffu8; 512], 0) {
        Ok(()) => false,
        Err(qcow2::Error::CorruptionDetected(m)) => {
            assert!(m.starts_with("Preventing invalid write on metadata"), "{m}");
            assert!(img.is_corrupt());
            true
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn overlap_check_modes() {
    let into_l1 = |l1: u64, _l2: u64| l1;
    let into_l2 = |_l1: u64, l2: u64| l2;
    // The default (QEMU's `cached`) checks both.
    assert!(write_into_metadata(into_l1, OverlapChecks::default()));
    assert!(write_into_metadata(into_l2, OverlapChecks::default()));
    // `constant`: fixed metadata only.
    assert!(write_into_metadata(into_l1, OverlapChecks::CONSTANT));
    assert!(!write_into_metadata(into_l2, OverlapChecks::CONSTANT));
    // `none`: the write goes where the entry says, as in QEMU.
    assert!(!write_into_metadata(into_l1, OverlapChecks::NONE));
    // Single flags.
    let no_l1 = OverlapChecks {
        active_l1: false,
        ..OverlapChecks::ALL
    };
    assert!(!write_into_metadata(into_l1, no_l1));
    assert!(write_into_metadata(into_l2, no_l1));
}

#[test]
fn oversized_snapshot_and_bitmap_tables() {
    let good = sample_image();
    // nb_snapshots within the limit but far more than the file holds.
    let mut b = good.clone();
    b[60..64].copy_from_slice(&60000u32.to_be_bytes());
    assert!(open_bytes(b, false).is_err());
    // Snapshot entry with extra data beyond QEMU's limit.
    let mut b = good.clone();
    let so = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    b[so + 36..so + 40].copy_from_slice(&0x10_0000u32.to_be_bytes());
    assert!(open_bytes(b, false).is_err());
    // Snapshot L1 table claiming an absurd size.
    let mut b = good.clone();
    b[so + 8..so + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(open_bytes(b, false).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn mutated_metadata_never_panics(
        muts in proptest::collection::vec((0usize..20 * 4096, any::<u8>()), 1..12)
    ) {
        let mut b = sample_image();
        for (pos, v) in muts {
            if pos < b.len() {
                b[pos] = v;
            }
        }
        exercise(b);
    }

    #[test]
    fn header_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), len in 0u64..1 << 40) {
        let _ = qcow2::Header::parse(&bytes, len);
    }

    #[test]
    fn header_parser_on_mutated_header(
        muts in proptest::collection::vec((0usize..512, any::<u8>()), 1..8)
    ) {
        let mut b = sample_image()[..4096].to_vec();
        for (pos, v) in muts {
            b[pos] = v;
        }
        let _ = qcow2::Header::parse(&b, 1 << 20);
    }

    #[test]
    fn snapshot_and_bitmap_parsers_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        count in 0u32..100,
        size in 0u64..8192,
    ) {
        let st = MemStorage::from_vec(bytes.clone());
        let _ = qcow2::snapshot_table::parse_table(&st, 0, count, bytes.len() as u64, 512);
        let ext = qcow2::header::BitmapsExt { nb_bitmaps: count, directory_size: size, directory_offset: 0 };
        let _ = qcow2::bitmap::parse_directory(&st, &ext, bytes.len() as u64, 512);
    }
}
