//! A ring written by a "vCPU" thread and read by a "monitor" thread at the
//! same time never loses or duplicates a byte beyond the overwrite rule.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry, DataFormat, RingBuf};

fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(offset >> 8)) as u8
}

/// Small xorshift so sizes vary without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn hammer(size: usize, total: u64, throttle: bool) {
    let ring = Arc::new(RingBuf::new(size).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let ring = ring.clone();
        let done = done.clone();
        thread::spawn(move || {
            let mut rng = Rng(0x1234_5678);
            let mut off = 0u64;
            let mut chunk = Vec::new();
            while off < total {
                let n = (1 + rng.next(97)).min(total - off);
                if throttle {
                    // A producer that never outruns the reader: no loss.
                    while ring.len() + n as usize > size {
                        thread::yield_now();
                    }
                }
                chunk.clear();
                chunk.extend((off..off + n).map(pattern));
                assert_eq!(ring.write(&chunk), n as usize);
                off += n;
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut rng = Rng(0x9abc_def0);
    let mut next = 0u64; // stream offset the reader expects next
    let mut received = 0u64;
    let mut gaps = 0u64;
    let mut buf = vec![0u8; 300];
    loop {
        let finished = done.load(Ordering::SeqCst);
        let want = 1 + rng.next(buf.len() as u64) as usize;
        let info = ring.read_at(&mut buf[..want]);
        if info.len > 0 {
            assert!(info.offset >= next, "duplicate: {} < {next}", info.offset);
            if info.offset > next {
                assert!(info.lost, "bytes skipped without an overwrite");
            }
            gaps += info.offset - next;
            for (i, &b) in buf[..info.len].iter().enumerate() {
                assert_eq!(b, pattern(info.offset + i as u64), "torn byte");
            }
            next = info.offset + info.len as u64;
            received += info.len as u64;
        } else if finished {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(received + gaps, total);
    assert_eq!(gaps, ring.overwritten());
    if throttle {
        assert_eq!(gaps, 0);
    }
}

#[test]
fn concurrent_small_ring_with_overwrites() {
    hammer(256, 600_000, false);
}

#[test]
fn concurrent_large_ring() {
    hammer(65536, 600_000, false);
}

#[test]
fn concurrent_throttled_producer_loses_nothing() {
    hammer(1024, 300_000, true);
}

/// The same through the chardev API: a frontend handle on a vCPU thread,
/// `ringbuf-read` in base64 on the monitor's thread. Records of 8 bytes
/// (a counter) let the reader check order, tearing and loss.
#[test]
fn frontend_writes_while_monitor_reads() {
    let mut reg = ChardevRegistry::new();
    let p = parse_chardev_opts("ringbuf,id=rb0,size=1024").unwrap();
    reg.add(&p.id, &p.config).unwrap();
    let (fe, _) = common::TestFrontend::boxed(0);
    let h = reg.attach("rb0", fe).unwrap();
    const N: u64 = 60_000;
    let vcpu = thread::spawn(move || {
        for i in 0..N {
            assert_eq!(h.write(&i.to_le_bytes()).unwrap(), 8);
        }
    });
    let mut last: Option<u64> = None;
    let mut got = 0u64;
    let mut skipped = 0u64;
    loop {
        let finished = vcpu.is_finished();
        let text = reg.ringbuf_read("rb0", 8 * 37, DataFormat::Base64).unwrap();
        let bytes = chardev_ringbuf::base64::decode(&text).unwrap();
        assert_eq!(bytes.len() % 8, 0, "a read split a record");
        for rec in bytes.chunks(8) {
            let v = u64::from_le_bytes(rec.try_into().unwrap());
            let expect = last.map_or(0, |l| l + 1);
            assert!(
                v >= expect,
                "duplicate or reordered record {v} after {last:?}"
            );
            skipped += v - expect;
            last = Some(v);
            got += 1;
        }
        if bytes.is_empty() && finished {
            break;
        }
    }
    vcpu.join().unwrap();
    assert_eq!(last, Some(N - 1));
    assert_eq!(got + skipped, N);
    assert_eq!(skipped * 8, reg.ring("rb0").unwrap().overwritten());
}
