//! `--ab`: the graph path and the qcow2 crate alone, alternated in one process, to measure
//! their difference at depth 1 more finely than whole runs can on a shared machine.
//!
//! Both paths use the same fully allocated image file: how a file was written decides how
//! the page cache holds it (folio sizes), which changes the kernel's cost of every request
//! by more than the graph's overhead, so two copies of one image are not comparable. The
//! crate opens it without image locks beside the graph; only data clusters are rewritten in
//! place, so the metadata both have cached stays true (a benchmark-only arrangement). A pair runs `--count` sequential requests on the
//! graph, then as many on the crate, each timed by the thread's CPU clock; the pair's ratio
//! is graph / crate. Adjacent blocks see the same machine state, so the median of the pair
//! ratios (and its spread) says what the overhead is even when the machine's speed drifts
//! between runs by more than the overhead itself.

use std::io::IoSlice;

use block_graph::stats::AcctType;
use block_graph::WriteFlags;

use super::{buffer, open_graph, thread_cpu_ns, REGION};

/// What the graph side of a pair does per request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GraphSide {
    /// `BlockBackend` requests.
    Plain,
    /// `BlockBackend` requests accounted as a device does (`Stats::account`).
    Accounted,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `pairs` pairs of `count` 4 KiB sequential requests (reads, or writes with `write`)
/// and prints the medians: ns per request of each path and the ratio.
pub fn run(img: &str, write: bool, pairs: usize, count: u64, side: GraphSide) {
    let (mut g, be) = open_graph(img);
    let q = qcow2::Qcow2::open_path(
        img,
        qcow2::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .expect("open the crate's image");
    let mut buf = buffer(4096);
    buf.fill(0x5a);
    let (mut og, mut oc) = (0u64, 0u64);
    let next = |o: &mut u64| {
        let v = *o;
        *o = (*o + 4096) % REGION;
        v
    };
    // Read both images once so that the page cache holds them before timing.
    for _ in 0..REGION / 4096 {
        let o = next(&mut og);
        be.read_buf(o, &mut buf).unwrap();
        q.read_at(&mut buf, o).unwrap();
    }
    let (mut rg, mut rc, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        let t = thread_cpu_ns();
        for _ in 0..count {
            let o = next(&mut og);
            let io = |buf: &mut [u8]| {
                if write {
                    be.write(o, &[IoSlice::new(buf)], WriteFlags::default())
                } else {
                    be.read_buf(o, buf)
                }
            };
            match side {
                GraphSide::Plain => io(&mut buf).unwrap(),
                GraphSide::Accounted => {
                    let ty = if write {
                        AcctType::Write
                    } else {
                        AcctType::Read
                    };
                    be.stats().account(ty, 4096, || io(&mut buf)).unwrap()
                }
            }
        }
        let g_ns = (thread_cpu_ns() - t) as f64 / count as f64;
        let t = thread_cpu_ns();
        for _ in 0..count {
            let o = next(&mut oc);
            if write {
                q.write_at(&buf, o).unwrap();
            } else {
                q.read_at(&mut buf, o).unwrap();
            }
        }
        let c_ns = (thread_cpu_ns() - t) as f64 / count as f64;
        rg.push(g_ns);
        rc.push(c_ns);
        ratio.push(g_ns / c_ns);
    }
    let mut sorted = ratio.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let quart = |p: usize| sorted[(sorted.len() - 1) * p / 4];
    println!(
        "ab {} 4k seq QD1{}: {pairs} pairs of {count}: graph {:.0} ns, crate {:.0} ns \
         (CPU per request, medians); graph/crate median {:.3} (quartiles {:.3} .. {:.3})",
        if write { "write" } else { "read" },
        if side == GraphSide::Accounted {
            " (device accounting)"
        } else {
            ""
        },
        median(&mut rg),
        median(&mut rc),
        quart(2),
        quart(1),
        quart(3),
    );
    drop(be);
    g.close_all();
    drop(q);
}
