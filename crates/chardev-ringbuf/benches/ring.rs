//! Ring-buffer throughput (MB/s): bulk writes and reads, byte-at-a-time
//! writes (a serial port's pattern, where the lock cost shows), a write and
//! read under contention with a second thread, and `ringbuf-read` through
//! the registry (copy + UTF-8 or base64 conversion).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chardev_ringbuf::{parse_chardev_opts, ChardevRegistry, DataFormat, RingBuf};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const SIZE: usize = 65536;

fn bulk(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    for chunk in [64usize, 4096] {
        let data = vec![0x5au8; chunk];
        let ring = RingBuf::new(SIZE).unwrap();
        let mut out = vec![0u8; chunk];
        g.throughput(Throughput::Bytes(chunk as u64));
        g.bench_function(format!("write+read {chunk}B"), |b| {
            b.iter(|| {
                ring.write(black_box(&data));
                black_box(ring.read(&mut out));
            })
        });
        g.bench_function(format!("write {chunk}B (overwriting)"), |b| {
            b.iter(|| ring.write(black_box(&data)))
        });
    }
    let ring = RingBuf::new(SIZE).unwrap();
    g.throughput(Throughput::Bytes(1));
    g.bench_function("write 1B (uncontended lock)", |b| {
        b.iter(|| ring.write(black_box(b"x")))
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring contended");
    let ring = Arc::new(RingBuf::new(SIZE).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let ring = ring.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                black_box(ring.read(&mut buf));
            }
        })
    };
    let data = vec![0x5au8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("write 4096B while another thread reads", |b| {
        b.iter(|| ring.write(black_box(&data)))
    });
    g.throughput(Throughput::Bytes(1));
    g.bench_function("write 1B while another thread reads", |b| {
        b.iter(|| ring.write(black_box(b"x")))
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    g.finish();
}

fn commands(c: &mut Criterion) {
    let mut g = c.benchmark_group("ringbuf commands");
    let mut reg = ChardevRegistry::new();
    let p = parse_chardev_opts("ringbuf,id=rb0,size=65536").unwrap();
    reg.add(&p.id, &p.config).unwrap();
    let text = "guest console output, with some UTF-8: caf\u{e9} \u{20ac}\n".repeat(64);
    let b64 = chardev_ringbuf::base64::encode(text.as_bytes());
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("ringbuf-write+read utf8", |b| {
        b.iter(|| {
            reg.ringbuf_write_str("rb0", black_box(&text), DataFormat::Utf8)
                .unwrap();
            black_box(reg.ringbuf_read("rb0", 1 << 20, DataFormat::Utf8).unwrap());
        })
    });
    g.bench_function("ringbuf-write+read base64", |b| {
        b.iter(|| {
            reg.ringbuf_write_str("rb0", black_box(&b64), DataFormat::Base64)
                .unwrap();
            black_box(
                reg.ringbuf_read("rb0", 1 << 20, DataFormat::Base64)
                    .unwrap(),
            );
        })
    });
    g.finish();
}

criterion_group!(benches, bulk, contended, commands);
criterion_main!(benches);
