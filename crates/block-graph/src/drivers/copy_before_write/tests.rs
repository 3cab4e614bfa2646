use std::sync::Arc;

use qapi_types::BlockdevOptions;
use serde_json::{json, Value};

use super::*;
use crate::backend::DeviceAttach;
use crate::BlockBackend;

const LEN: u64 = 4 << 20;

fn opts(v: Value) -> BlockdevOptions {
    BlockdevOptions::from_qmp_strict(v).unwrap()
}

/// A byte that depends on the offset and a generation (so old and new data differ).
fn pattern(off: u64, gen: u8) -> u8 {
    ((off / 512) as u8).wrapping_mul(31).wrapping_add(gen)
}

fn fill(buf: &mut [u8], off: u64, gen: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(off + i as u64 / 512 * 512, gen);
    }
}

struct Setup {
    g: BlockGraph,
    be: Arc<BlockBackend>,
    src: Arc<Node>,
    tgt: Arc<Node>,
    original: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// A guest disk `disk0` on a raw source full of generation-1 data, and an empty raw
/// target `tgt` (optionally with `target_file` inserted between raw and file).
fn setup(target_filter: Option<Value>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("src.raw");
    let t = dir.path().join("tgt.raw");
    let mut original = vec![0u8; LEN as usize];
    fill(&mut original, 0, 1);
    std::fs::write(&s, &original).unwrap();
    std::fs::write(&t, vec![0u8; LEN as usize]).unwrap();
    let mut g = BlockGraph::new();
    let src = g
        .blockdev_add(&opts(json!({"driver": "raw", "node-name": "src",
            "file": {"driver": "file", "filename": s.to_str().unwrap()}})))
        .unwrap();
    let tfile = json!({"driver": "file", "filename": t.to_str().unwrap()});
    let tfile = match target_filter {
        Some(mut f) => {
            f["image"] = tfile;
            f["driver"] = json!("blkdebug");
            f
        }
        None => tfile,
    };
    let tgt = g
        .blockdev_add(&opts(
            json!({"driver": "raw", "node-name": "tgt", "file": tfile}),
        ))
        .unwrap();
    let be = g
        .create_backend("disk0", Some(&src), Default::default())
        .unwrap();
    g.attach_device(
        &be,
        DeviceAttach {
            resizable: false,
            ..DeviceAttach::disk("vd0")
        },
    )
    .unwrap();
    Setup {
        g,
        be,
        src,
        tgt,
        original,
        _dir: dir,
    }
}

fn read_all(n: &Arc<Node>, g: &mut BlockGraph) -> Vec<u8> {
    let r = g
        .new_root(n, Perm::CONSISTENT_READ, Perm::ALL, "a reader")
        .unwrap();
    let mut buf = vec![0u8; LEN as usize];
    r.read_buf(0, &mut buf).unwrap();
    g.release_root(&r);
    buf
}

#[test]
fn guest_writes_copy_old_data_first_and_the_rest_is_copied_later() {
    let mut s = setup(None);
    let (filter, st) = s.g.cbw_append(&s.src, &s.tgt, None).unwrap();
    assert!(filter.is_implicit());
    assert_eq!(s.be.root_node().unwrap().name(), filter.name());
    assert_eq!(st.remaining(), LEN);
    // A guest write in the middle of a cluster copies the whole cluster first.
    let mut new = vec![0u8; 8192];
    fill(&mut new, 100_000, 2);
    s.be.write_buf(100_000 / 512 * 512, &new, WriteFlags::default())
        .unwrap();
    let c = st.cluster_size();
    assert_eq!(
        st.remaining(),
        LEN - c * (1 + u64::from((100_352 + 8192) / c > 100_352 / c))
    );
    let t = read_all(&s.tgt, &mut s.g);
    let c0 = (100_352 / c * c) as usize;
    assert_eq!(t[c0..c0 + c as usize], s.original[c0..c0 + c as usize]);
    assert!(t[..c0].iter().all(|b| *b == 0), "nothing else copied yet");
    // A second write to the same cluster copies nothing more.
    let before = st.copied();
    s.be.write_buf(c0 as u64, &[9u8; 512], WriteFlags::default())
        .unwrap();
    assert_eq!(st.copied(), before);
    // The background copy moves the rest; the target is the point-in-time view.
    st.copy(0, LEN, false).unwrap();
    assert_eq!(st.remaining(), 0);
    assert_eq!(read_all(&s.tgt, &mut s.g), s.original);
    // Removing the filter gives the guest its source back.
    s.g.cbw_drop(&filter).unwrap();
    drop(filter);
    assert_eq!(s.be.root_node().unwrap().name(), "src");
    assert!(s
        .g
        .nodes()
        .iter()
        .all(|n| n.driver_name() != "copy-before-write"));
}

#[test]
fn concurrent_writers_and_background_copy_keep_the_point_in_time_view() {
    let mut s = setup(None);
    let (filter, st) = s.g.cbw_append(&s.src, &s.tgt, None).unwrap();
    let be = s.be.clone();
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let be = be.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for i in 0..200u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (LEN / 4096) * 4096;
                    let len = 4096 * (1 + i % 20);
                    let len = len.min(LEN - off);
                    let mut buf = vec![0u8; len as usize];
                    fill(&mut buf, off, 7 + t as u8);
                    be.write_buf(off, &buf, WriteFlags::default()).unwrap();
                }
            })
        })
        .collect();
    let bg = {
        let st = st.clone();
        std::thread::spawn(move || {
            let mut pos = 0;
            while let Some(d) = st.next_dirty(pos) {
                st.copy(d, 256 * 1024, false).unwrap();
                pos = d + 256 * 1024;
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    bg.join().unwrap();
    st.copy(0, LEN, true).unwrap();
    st.wait_idle();
    assert_eq!(st.remaining(), 0);
    assert_eq!(read_all(&s.tgt, &mut s.g), s.original);
    s.g.cbw_drop(&filter).unwrap();
}

#[test]
fn failed_copy_fails_the_guest_write_or_breaks_the_snapshot() {
    let mut s = setup(Some(
        json!({"inject-error": [{"event": "write_aio", "errno": 28}]}),
    ));
    let (filter, st) = s.g.cbw_append(&s.src, &s.tgt, None).unwrap();
    assert_eq!(st.on_error(), OnCbwError::BreakGuestWrite);
    let e =
        s.be.write_buf(0, &[1u8; 512], WriteFlags::default())
            .unwrap_err();
    assert_eq!(e.errno_value(), libc::ENOSPC);
    // Nothing was written to the source and the cluster still needs copying.
    assert_eq!(read_all(&s.src, &mut s.g)[..512], s.original[..512]);
    assert!(st.is_dirty(0));
    st.set_on_error(OnCbwError::BreakSnapshot);
    s.be.write_buf(0, &[1u8; 512], WriteFlags::default())
        .unwrap();
    assert!(st.is_broken());
    assert_eq!(read_all(&s.src, &mut s.g)[..512], [1u8; 512]);
    s.g.cbw_drop(&filter).unwrap();
}

#[test]
fn blockdev_add_with_a_bitmap_copies_only_its_dirty_clusters() {
    let mut s = setup(None);
    let bm = Arc::new(DirtyBitmap::new("b0", 65536, LEN).unwrap());
    bm.set_range(3 * 65536, 10);
    s.src.add_bitmap(bm).unwrap();
    let f =
        s.g.blockdev_add(&opts(
            json!({"driver": "copy-before-write", "node-name": "cbw",
            "file": "src", "target": "tgt", "bitmap": {"node": "src", "name": "b0"}}),
        ))
        .unwrap();
    let st = CopyBeforeWrite::of(&f).unwrap();
    assert_eq!(st.remaining(), 65536);
    assert_eq!(st.next_dirty(0), Some(3 * 65536));
    // A writer above the filter is refused while the guest writes the source directly
    // (such writes would bypass the copy).
    let err =
        s.g.new_root(&f, Perm::WRITE, Perm::ALL, "a writer of the filter")
            .unwrap_err();
    assert!(err.to_string().contains("Permission conflict"), "{err}");
    let missing = s.g.blockdev_add(&opts(json!({"driver": "copy-before-write",
        "node-name": "cbw2", "file": "src", "target": "tgt",
        "bitmap": {"node": "src", "name": "nope"}})));
    assert!(missing
        .unwrap_err()
        .to_string()
        .contains("'nope' not found"));
}

#[test]
fn smaller_target_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(
        json!({"driver": "null-co", "node-name": "a", "size": 1048576}),
    ))
    .unwrap();
    g.blockdev_add(&opts(
        json!({"driver": "null-co", "node-name": "b", "size": 65536}),
    ))
    .unwrap();
    let e = g
        .blockdev_add(&opts(
            json!({"driver": "copy-before-write", "node-name": "c",
            "file": "a", "target": "b"}),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("different sizes"), "{e}");
    drop(dir);
}
