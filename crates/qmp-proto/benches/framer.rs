//! Throughput of the framer (lexing, bounds, parsing into `serde_json::Value`)
//! and of the encoder, in bytes of JSON per second.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qmp_proto::encode::{write_message, KeyOrder};
use qmp_proto::framer::Framer;
use serde_json::{json, Value};

/// One request carrying a large string (like a base64 ringbuf-write).
fn big_string_message(len: usize) -> Vec<u8> {
    let mut m =
        b"{\"execute\": \"ringbuf-write\", \"arguments\": {\"device\": \"serial0\", \"data\": \""
            .to_vec();
    m.extend(
        (0..len)
            .map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64]),
    );
    m.extend_from_slice(b"\"}, \"id\": 1}\r\n");
    m
}

/// One message with many small members (like a large query-blockstats).
fn structured_message(entries: usize) -> Vec<u8> {
    let stats: Vec<Value> = (0..entries)
        .map(|i| {
            json!({
                "device": format!("drive{i}"),
                "node-name": format!("#block{i:03}"),
                "stats": {
                    "rd_bytes": 1_234_567_u64 * i as u64, "wr_bytes": 7_654_321_u64 * i as u64,
                    "rd_operations": i, "wr_operations": i * 2, "flush_operations": 3,
                    "wr_highest_offset": 1 << 30, "idle_time_ns": 1_000_000_000_u64,
                    "account_invalid": true, "account_failed": false, "timed_stats": []
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    write_message(&mut out, &json!({"return": stats, "id": 1}), KeyOrder::Qemu);
    out
}

/// Many small requests back to back.
fn small_messages(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(
            format!("{{\"execute\": \"query-status\", \"id\": {i}}}\r\n").as_bytes(),
        );
    }
    out
}

fn run_framer(input: &[u8], chunk: usize) -> usize {
    let mut framer = Framer::new();
    let mut count = 0;
    for piece in input.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (used, item) = framer.advance(rest);
            if let Some(v) = item {
                black_box(&v);
                count += 1;
            }
            rest = &rest[used..];
        }
    }
    count
}

fn framer(c: &mut Criterion) {
    let mut group = c.benchmark_group("framer");
    let cases = [
        ("string-1MiB", big_string_message(1 << 20)),
        ("string-16MiB", big_string_message(16 << 20)),
        ("structured-2MiB", structured_message(6000)),
        ("small-messages", small_messages(20_000)),
    ];
    for (name, input) in &cases {
        group.throughput(Throughput::Bytes(input.len() as u64));
        if name.starts_with("string-16") {
            group.sample_size(10);
        }
        group.bench_with_input(BenchmarkId::new("parse", name), input, |b, input| {
            b.iter(|| run_framer(input, 64 * 1024))
        });
    }
    group.finish();
}

fn encoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let values = [
        (
            "string-1MiB",
            json!({"return": "x".repeat(1 << 20), "id": 1}),
        ),
        (
            "structured",
            qmp_proto::json::parse(&structured_message(6000)).unwrap_or(Value::Null),
        ),
    ];
    for (name, value) in &values {
        let mut probe = Vec::new();
        write_message(&mut probe, value, KeyOrder::Qemu);
        group.throughput(Throughput::Bytes(probe.len() as u64));
        for order in [KeyOrder::Qemu, KeyOrder::Insertion] {
            group.bench_with_input(
                BenchmarkId::new(format!("{order:?}"), name),
                value,
                |b, value| {
                    b.iter(|| {
                        let mut out = Vec::with_capacity(probe.len());
                        write_message(&mut out, value, order);
                        out
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, framer, encoder);
criterion_main!(benches);
