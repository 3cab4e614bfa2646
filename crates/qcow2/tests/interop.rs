//! Interoperability with QEMU's tools: images qemu-img makes read identically through this
//! crate and stay clean after we write; images we make and write pass `qemu-img check` and
//! compare equal to a raw reference.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use qcow2::{CompressionType, CreateOptions, FollowFiles, OpenOptions, Preallocation, Qcow2};

const SIZE: u64 = 4 << 20;

fn open_rw(path: &Path) -> Qcow2 {
    Qcow2::open_path(
        path,
        OpenOptions {
            writable: true,
            opener: Arc::new(FollowFiles::default()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(img: &Qcow2) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Random workload applied to the image and to an in-memory reference.
fn workload(img: &Qcow2, reference: &mut [u8], seed: u64, ops: usize, v3: bool) {
    let mut rng = Rng(seed);
    let cs = img.cluster_size();
    let size = img.size();
    for _ in 0..ops {
        let kind = rng.below(10);
        let off = rng.below(size);
        let len = (1 + rng.below(3 * cs.min(256 << 10))).min(size - off);
        match kind {
            0..=5 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                img.write_at(&buf, off).unwrap();
                reference[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            6 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                reference[off as usize..(off + len) as usize].fill(0);
            }
            7 if v3 => {
                img.discard(off, len).unwrap();
                let start = off.div_ceil(cs) * cs;
                let mut end = (off + len) / cs * cs;
                if off + len == size {
                    end = off + len;
                }
                if start < end {
                    reference[start as usize..end as usize].fill(0);
                }
            }
            8 => {
                let c = (off / cs) * cs;
                let n = cs.min(size - c);
                let mut buf = vec![0u8; n as usize];
                // Compressible: repeated short pattern.
                let b = rng.next() as u8;
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = b.wrapping_add((i / 64) as u8);
                }
                img.write_compressed(&buf, c).unwrap();
                reference[c as usize..(c + n) as usize].copy_from_slice(&buf);
            }
            _ => {
                img.flush().unwrap();
                let mut got = vec![0u8; len as usize];
                img.read_at(&mut got, off).unwrap();
                assert_eq!(got, &reference[off as usize..(off + len) as usize]);
            }
        }
    }
}

fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[test]
fn our_images_pass_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let variants: Vec<(&str, CreateOptions)> = vec![
        ("default", CreateOptions::new(SIZE)),
        (
            "v2",
            CreateOptions {
                version: 2,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "c512",
            CreateOptions {
                cluster_size: 512,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "c4k_rb1",
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 1,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "c2m_rb64",
            CreateOptions {
                cluster_size: 2 << 20,
                refcount_bits: 64,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "zstd_extl2",
            CreateOptions {
                compression_type: CompressionType::Zstd,
                extended_l2: true,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "lazy",
            CreateOptions {
                lazy_refcounts: true,
                ..CreateOptions::new(SIZE)
            },
        ),
        (
            "prealloc",
            CreateOptions {
                preallocation: Preallocation::Metadata,
                ..CreateOptions::new(SIZE)
            },
        ),
    ];
    for (name, opts) in variants {
        let path = p(dir.path(), &format!("{name}.qcow2"));
        Qcow2::create_path(&path, &opts).unwrap();
        assert_clean(&path, false);
        let mut reference = vec![0u8; SIZE as usize];
        {
            let img = open_rw(&path);
            workload(
                &img,
                &mut reference,
                42 + opts.cluster_size,
                120,
                opts.version == 3,
            );
            img.close().unwrap();
        }
        let raw = p(dir.path(), &format!("{name}.raw"));
        write_raw(&raw, &reference);
        assert_clean(&path, false);
        assert_same(&path, "qcow2", &raw, "raw");
        // Reading back through our crate after reopen.
        let img = Qcow2::open_path(&path, OpenOptions::default()).unwrap();
        assert!(read_all(&img) == reference, "{name}: readback differs");
    }
}

#[test]
fn qemu_images_read_identically_and_stay_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let variants: &[(&str, &str)] = &[
        ("v2", "compat=0.10"),
        ("v3", "compat=1.1"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2M"),
        ("rb8", "refcount_bits=8"),
        ("extl2", "extended_l2=on,cluster_size=128k"),
        ("zstd", "compression_type=zstd"),
        ("pmeta", "preallocation=metadata"),
        ("pfalloc", "preallocation=falloc"),
        ("pfull", "preallocation=full"),
        ("lazy", "lazy_refcounts=on"),
    ];
    for (name, o) in variants {
        let path = p(dir.path(), &format!("{name}.qcow2"));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, s(&path), "4M"],
        );
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 100k",
                "-c",
                "write -P 0x22 1M 64k",
                "-c",
                "write -z 1040k 8k",
                "-c",
                "write -P 0x33 3000k 5000",
                "-c",
                "discard 0 64k",
                s(&path),
            ],
        );
        // A compressed copy through convert -c.
        let comp = p(dir.path(), &format!("{name}-c.qcow2"));
        let mut copts = String::from("compat=1.1");
        if o.contains("zstd") {
            copts.push_str(",compression_type=zstd");
        }
        if o.contains("compat=0.10") {
            copts = "compat=0.10".into();
        }
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &copts,
                s(&path),
                s(&comp),
            ],
        );
        for img_path in [&path, &comp] {
            let raw = p(dir.path(), "ref.raw");
            run("qemu-img", &["convert", "-O", "raw", s(img_path), s(&raw)]);
            let mut reference = std::fs::read(&raw).unwrap();
            {
                let img = open_rw(img_path);
                assert!(
                    read_all(&img) == reference,
                    "{name}: read differs from qemu's"
                );
                workload(&img, &mut reference, 7, 60, !o.contains("0.10"));
            }
            write_raw(&raw, &reference);
            assert_clean(img_path, false);
            assert_same(img_path, "qcow2", &raw, "raw");
        }
    }
}

#[test]
fn backing_chain_three_deep() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = p(dir.path(), "base.raw");
    let mid = p(dir.path(), "mid.qcow2");
    let top = p(dir.path(), "top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "raw", s(&base), "4M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xaa 0 4M", s(&base)],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0xbb 512k 1M",
            "-c",
            "write -z 2M 64k",
            s(&mid),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    run("qemu-io", &["-c", "write -P 0xcc 1000k 10k", s(&top)]);
    let raw = p(dir.path(), "ref.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&top), s(&raw)]);
    let mut reference = std::fs::read(&raw).unwrap();
    {
        let img = open_rw(&top);
        assert!(read_all(&img) == reference);
        // Block status reports the depth.
        let st = img.block_status(0, 4096).unwrap();
        assert_eq!(st.depth, 2);
        let st = img.block_status(512 << 10, 4096).unwrap();
        assert_eq!(st.depth, 1);
        let st = img.block_status(1000 << 10, 4096).unwrap();
        assert_eq!(st.depth, 0);
        workload(&img, &mut reference, 99, 80, true);
    }
    write_raw(&raw, &reference);
    assert_clean(&top, false);
    assert_same(&top, "qcow2", &raw, "raw");
    // A loop in the chain is refused, not followed forever.
    let a = p(dir.path(), "a.qcow2");
    let b = p(dir.path(), "b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&b),
        ],
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
        ],
    );
    let e = Qcow2::open_path(
        &b,
        OpenOptions {
            opener: Arc::new(FollowFiles::default()),
            ..Default::default()
        },
    );
    assert!(e.is_err());
}

#[test]
fn external_data_files_both_ways() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // QEMU's image with a data file, read and written by us.
    let q = p(dir.path(), "q.qcow2");
    let qdata = p(dir.path(), "q.data");
    let opt = format!("data_file={}", s(&qdata));
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opt, s(&q), "4M"],
    );
    run("qemu-io", &["-c", "write -P 5 64k 200k", s(&q)]);
    let raw = p(dir.path(), "ref.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&q), s(&raw)]);
    let mut reference = std::fs::read(&raw).unwrap();
    {
        let img = open_rw(&q);
        assert!(read_all(&img) == reference);
        let mut rng = Rng(3);
        for _ in 0..40 {
            let off = rng.below(SIZE - 70_000);
            let mut buf = vec![0u8; 1 + rng.below(70_000) as usize];
            rng.fill(&mut buf);
            img.write_at(&buf, off).unwrap();
            reference[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
        img.write_zeroes(1 << 20, 1 << 20, true).unwrap();
        reference[1 << 20..2 << 20].fill(0);
        assert!(img.write_compressed(&[1u8; 65536], 0).is_err());
    }
    write_raw(&raw, &reference);
    assert_clean(&q, false);
    assert_same(&q, "qcow2", &raw, "raw");
    // Ours with a raw data file: the data file alone is the disk.
    let o = p(dir.path(), "o.qcow2");
    let data = p(dir.path(), "o.data");
    std::fs::write(&data, vec![0u8; SIZE as usize]).unwrap();
    let file: Arc<dyn qcow2::Storage> = Arc::new(qcow2::FileStorage::create(&o).unwrap());
    let data_st: Arc<dyn qcow2::Storage> =
        Arc::new(qcow2::FileStorage::open(&data, true, false).unwrap());
    Qcow2::create_with_data(
        file,
        Some(data_st),
        &CreateOptions {
            data_file: Some(s(&data).to_string()),
            data_file_raw: true,
            ..CreateOptions::new(SIZE)
        },
    )
    .unwrap();
    {
        let img = open_rw(&o);
        img.write_at(&reference, 0).unwrap();
    }
    assert_clean(&o, false);
    assert_same(&o, "qcow2", &raw, "raw");
    assert_same(&data, "raw", &raw, "raw");
    let info = run("qemu-img", &["info", s(&o)]);
    assert!(info.contains("data file raw: true"), "{info}");
}

#[test]
fn direct_io_storage() {
    if !have_qemu() {
        return;
    }
    // O_DIRECT needs a file system that supports it; tmpfs does not.
    let dir = match tempfile::tempdir_in("/var/tmp") {
        Ok(d) => d,
        Err(_) => return,
    };
    let path = p(dir.path(), "d.qcow2");
    Qcow2::create_path(&path, &CreateOptions::new(SIZE)).unwrap();
    let opened = Qcow2::open_path(
        &path,
        OpenOptions {
            writable: true,
            direct: true,
            ..Default::default()
        },
    );
    let Ok(img) = opened else {
        return;
    };
    let mut reference = vec![0u8; SIZE as usize];
    workload(&img, &mut reference, 11, 60, true);
    drop(img);
    let raw = p(dir.path(), "ref.raw");
    write_raw(&raw, &reference);
    assert_clean(&path, false);
    assert_same(&path, "qcow2", &raw, "raw");
}
