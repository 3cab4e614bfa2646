//! `bench`: qemu-img bench's workload.
//!
//! Requests are mapped by the qcow2 layer ([`qcow2::Qcow2::map`] /
//! [`qcow2::Qcow2::prepare_write`]) and the data I/O goes straight to the image's file through
//! an I/O engine ([`crate::aio`]: `-i threads|native|io_uring`; by default positional syscalls
//! in place for the page cache and io_uring for `O_DIRECT`), `depth` requests in flight.
//! Requests the format cannot turn into one host range (zero or unallocated reads,
//! copy-on-write) run in place. Images opened through the block graph (`json:`,
//! `--image-opts`, other drivers) run batches of `depth` requests through the graph.

use std::time::Instant;

use block_graph::batch::BatchReq;
use qcow2::{AlignedBuf, IoGuard, MappingKind, WritePlan};

use crate::aio::{AioMode, Engine, Request};
use crate::graph_img::{GraphImage, Source};
use crate::img::{parse_size, Cache, Image};
use crate::Error;

/// qemu-img bench's flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    /// Image format.
    #[arg(short = 'f')]
    fmt: Option<String>,
    /// Flush after this many requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// AIO mode: threads, native or io_uring (default: syscalls in place for the page cache,
    /// io_uring for O_DIRECT).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Native AIO (short for -i native; needs -t none).
    #[arg(short = 'n')]
    native: bool,
    /// Do not drain before flushes.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// First offset.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern")]
    pattern: Option<u8>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size.
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Offset step between requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Force share (accepted for compatibility).
    #[arg(short = 'U')]
    force_share: bool,
    /// The image is a key=value option string (opened through the block graph).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image.
    filename: String,
}

struct Slot<'a> {
    buf: AlignedBuf,
    guard: Option<IoGuard<'a>>,
    plan: Option<WritePlan<'a>>,
    busy: bool,
}

pub fn bench(a: &BenchArgs) -> Result<i32, Error> {
    let cache = Cache::parse(&a.cache)?;
    let bufsize = parse_size(&a.size)?;
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => bufsize,
    };
    let mut offset = parse_size(&a.offset)?;
    if a.depth == 0 || a.depth > 4096 {
        return Err(Error::msg("Invalid queue depth specified"));
    }
    if a.flush_interval.is_some() && !a.write {
        return Err(Error::msg(
            "--flush-interval is only available in write tests",
        ));
    }
    let mut mode = AioMode::Auto;
    if a.native {
        mode = AioMode::Native;
    }
    if let Some(m) = &a.aio {
        mode = AioMode::parse(m)?;
    }
    if mode == AioMode::Native && !cache.direct() {
        return Err(Error::msg(format!(
            "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
            a.filename
        )));
    }
    let src = Source::new(&a.filename, a.fmt.as_deref(), a.image_opts, a.force_share);
    let img = Image::open_source(&src, a.write, cache)?;
    let size = img.size();
    if bufsize == 0 || bufsize > size {
        return Err(Error::msg("Invalid buffer size specified"));
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            bufsize,
            a.depth,
            offset,
            step
        );
        if let Some(f) = a.flush_interval {
            println!("Sending flush every {f} requests");
        }
    }
    if let Image::Graph(g) = &img {
        let r = Requests {
            count: a.count,
            depth: a.depth,
            size: bufsize,
            offset,
            step,
            write: a.write,
            pattern: a.pattern.unwrap_or(0),
            flush_interval: a.flush_interval,
        };
        return bench_graph(g, &r, a.quiet);
    }
    let fd = img
        .data_storage()
        .and_then(|st| st.raw_fd())
        .ok_or_else(|| Error::msg("image has no file descriptor"))?;
    let mut engine = Engine::new(mode, fd, a.depth, cache.direct())?;
    let mut slots: Vec<Slot<'_>> = (0..a.depth)
        .map(|_| {
            let mut buf = AlignedBuf::new(bufsize as usize, 4096);
            buf.fill(a.pattern.unwrap_or(0));
            Slot {
                buf,
                guard: None,
                plan: None,
                busy: false,
            }
        })
        .collect();
    let qimg = match &img {
        Image::Qcow2(q) => Some(q.as_ref()),
        _ => None,
    };
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut inflight = 0usize;
    let mut since_flush = 0u64;
    let mut retry: Option<u64> = None;
    let mut done: Vec<(usize, i64)> = Vec::with_capacity(a.depth);
    let start = Instant::now();
    while completed < a.count {
        // Fill the queue.
        while submitted < a.count && inflight < a.depth {
            let idx = slots.iter().position(|s| !s.busy).expect("a free slot");
            let off = match retry.take() {
                Some(o) => o,
                None => {
                    let o = offset;
                    offset = (offset + step) % size;
                    o
                }
            };
            if off + bufsize > size {
                return Err(Error::msg("Failed request: Input/output error"));
            }
            let slot = &mut slots[idx];
            let host = match qimg {
                None => Some(off),
                Some(q) if !a.write => {
                    let g = q.io_guard();
                    let m = q.map(off, bufsize)?;
                    match m.kind {
                        MappingKind::Data { host_offset } if m.len == bufsize => {
                            slot.guard = Some(g);
                            Some(host_offset)
                        }
                        _ => {
                            drop(g);
                            q.read_at(&mut slot.buf, off)?;
                            None
                        }
                    }
                }
                Some(q) => {
                    let Some(plan) = q.try_prepare_write(off, bufsize)? else {
                        // Another request in flight is allocating this cluster: let it
                        // complete first.
                        retry = Some(off);
                        break;
                    };
                    if plan.len == bufsize && plan.cow.is_empty() {
                        let h = plan.host_offset;
                        slot.plan = Some(plan);
                        Some(h)
                    } else {
                        let mut plan = plan;
                        let mut done = 0u64;
                        loop {
                            let n = plan.len;
                            q.execute_plan(&plan, &slot.buf[done as usize..(done + n) as usize])?;
                            q.commit_write(plan)?;
                            done += n;
                            if done == bufsize {
                                break;
                            }
                            plan = q.prepare_write(off + done, bufsize - done)?;
                        }
                        None
                    }
                }
            };
            submitted += 1;
            let Some(host) = host else {
                // Done in place (zero or unallocated reads, copy-on-write).
                completed += 1;
                since_flush += 1;
                continue;
            };
            slot.busy = true;
            inflight += 1;
            let r = Request {
                slot: idx,
                write: a.write,
                buf: slot.buf.as_mut_ptr(),
                len: bufsize as usize,
                offset: host,
            };
            // SAFETY: the buffer belongs to a slot marked busy; nothing else touches it during
            // the call.
            if let Some(res) = unsafe { engine.run_sync(&r) } {
                // Page-cache I/O done in place: complete it now, so the plan is committed
                // before the next request looks at the same cluster.
                complete(&mut slots, idx, res, bufsize, qimg)?;
                inflight -= 1;
                completed += 1;
                since_flush += 1;
            } else {
                // SAFETY: the slot stays busy, its buffer neither dropped nor touched, until
                // its completion has been reaped below; the descriptor stays open (the image
                // outlives the loop).
                unsafe { engine.submit(r)? };
            }
        }
        if inflight > 0 {
            done.clear();
            engine.wait(&mut done)?;
            for &(ud, res) in &done {
                complete(&mut slots, ud, res, bufsize, qimg)?;
                inflight -= 1;
                completed += 1;
                since_flush += 1;
            }
        }
        if let Some(fi) = a.flush_interval {
            if since_flush >= fi && (a.no_drain || inflight == 0) {
                img.flush()?;
                since_flush = 0;
            }
        }
    }
    let elapsed = start.elapsed();
    if !a.quiet {
        println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    }
    drop(engine);
    drop(slots);
    if let Image::Qcow2(q) = &img {
        q.close()?;
    }
    Ok(0)
}

/// Finishes the request of slot `ud`: checks the result, releases the mapping, publishes
/// the allocation.
fn complete(
    slots: &mut [Slot<'_>],
    ud: usize,
    res: i64,
    bufsize: u64,
    qimg: Option<&qcow2::Qcow2>,
) -> Result<(), Error> {
    let slot = slots
        .get_mut(ud)
        .ok_or_else(|| Error::msg("completion for an unknown request"))?;
    slot.busy = false;
    slot.guard = None;
    if res < 0 || res as u64 != bufsize {
        return Err(Error::msg(format!(
            "Failed request: {}",
            if res < 0 {
                std::io::Error::from_raw_os_error(-res as i32).to_string()
            } else {
                "short transfer".into()
            }
        )));
    }
    if let (Some(p), Some(q)) = (slot.plan.take(), qimg) {
        q.commit_write(p)?;
    }
    Ok(())
}

/// What `bench` sends.
struct Requests {
    count: u64,
    depth: usize,
    size: u64,
    offset: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: Option<u64>,
}

/// `bench` on an image opened through the block graph: batches of `depth` requests, all in
/// flight together (the graph's batch API), through the image's root.
fn bench_graph(g: &GraphImage, r: &Requests, quiet: bool) -> Result<i32, Error> {
    let be = g.backend();
    let size = g.size();
    let mut bufs: Vec<Vec<u8>> = (0..r.depth)
        .map(|_| vec![r.pattern; r.size as usize])
        .collect();
    let mut offset = r.offset;
    let mut sent = 0u64;
    let mut since_flush = 0u64;
    let start = Instant::now();
    while sent < r.count {
        let n = (r.count - sent).min(r.depth as u64) as usize;
        let mut offs = Vec::with_capacity(n);
        for _ in 0..n {
            if offset + r.size > size {
                return Err(Error::msg("Failed request: Input/output error"));
            }
            offs.push(offset);
            offset = (offset + r.step) % size;
        }
        let mut reqs: Vec<BatchReq<'_>> = bufs
            .iter_mut()
            .zip(&offs)
            .map(|(b, &o)| {
                if r.write {
                    BatchReq::write(o, b)
                } else {
                    BatchReq::read(o, b)
                }
            })
            .collect();
        be.submit_batch(&mut reqs);
        for q in &reqs {
            if let Some(Err(e)) = &q.result {
                return Err(Error::msg(format!("Failed request: {e}")));
            }
        }
        sent += n as u64;
        since_flush += n as u64;
        if let Some(fi) = r.flush_interval {
            if since_flush >= fi {
                be.flush()
                    .map_err(|e| Error::msg(format!("Failed flush request: {e}")))?;
                since_flush = 0;
            }
        }
    }
    if !quiet {
        println!(
            "Run completed in {:.3} seconds.",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}
