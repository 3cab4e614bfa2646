//! Unit tests of the `file` driver.

use super::*;

fn open(path: &std::path::Path, direct: bool) -> FileDriver {
    FileDriver::open(&FileOptions {
        filename: path.to_string_lossy().into(),
        read_only: false,
        direct,
        locking: true,
        io_uring: false,
    })
    .unwrap()
}

#[test]
fn vectored_io_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let f = open(&p, false);
    let a = [1u8; 100];
    let b = [2u8; 28];
    f.write(
        4096,
        &[IoSlice::new(&a), IoSlice::new(&b)],
        WriteFlags { fua: true },
    )
    .unwrap();
    let mut x = [0u8; 64];
    let mut y = [0u8; 64];
    f.read(
        4096 + 64,
        &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
    )
    .unwrap();
    assert_eq!(&x[..36], &[1u8; 36][..]);
    assert_eq!(&x[36..], &[2u8; 28][..]);
    assert_eq!(y, [0u8; 64]);
    f.write_zeroes(
        0,
        8192,
        ZeroFlags {
            may_unmap: true,
            fua: false,
        },
    )
    .unwrap();
    let mut z = [9u8; 128];
    f.read(4096, &mut [IoSliceMut::new(&mut z)]).unwrap();
    assert_eq!(z, [0u8; 128]);
    assert_eq!(f.length().unwrap(), 1 << 20);
    f.truncate(2 << 20).unwrap();
    assert_eq!(f.length().unwrap(), 2 << 20);
    let st = f.block_status(1 << 20, 1 << 20).unwrap();
    assert!(matches!(
        st.kind,
        StatusKind::Zero { .. } | StatusKind::Data { .. }
    ));
}

#[test]
fn missing_file_is_worded_like_qemu() {
    let e = FileDriver::open(&FileOptions {
        filename: "/nonexistent/x".into(),
        read_only: true,
        direct: false,
        locking: true,
        io_uring: false,
    })
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "Could not open '/nonexistent/x': No such file or directory"
    );
}

#[test]
fn direct_io_bounces_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d");
    std::fs::write(&p, vec![7u8; 64 << 10]).unwrap();
    let f = match FileDriver::open(&FileOptions {
        filename: p.to_string_lossy().into(),
        read_only: false,
        direct: true,
        locking: false,
        io_uring: false,
    }) {
        Ok(f) => f,
        // tmpfs has no O_DIRECT.
        Err(BlockError::Io { errno, .. }) if errno == libc::EINVAL => return,
        Err(e) => panic!("{e}"),
    };
    assert!(f.alignment() >= 512);
    let data = [3u8; 700];
    f.write(100, &[IoSlice::new(&data)], WriteFlags::default())
        .unwrap();
    let mut back = [0u8; 1000];
    f.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert_eq!(&back[..100], &[7u8; 100][..]);
    assert_eq!(&back[100..800], &[3u8; 700][..]);
    assert_eq!(&back[800..], &[7u8; 200][..]);
    f.write_zeroes(1, 10, ZeroFlags::default()).unwrap();
    f.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert_eq!(back[0], 7);
    assert_eq!(&back[1..11], &[0u8; 10][..]);
}
