//! convert, compare, rebase and commit: the commands that copy guest data.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use qcow2::Preallocation;

use crate::cmds::{create_qcow2, parse_options};
use crate::img::{create_raw, Cache, Image};
use crate::Error;

/// Bytes one worker handles at a time.
const CHUNK: u64 = 2 << 20;

/// Arguments of `convert`.
pub struct ConvertArgs {
    pub fmt: Option<String>,
    pub out_fmt: String,
    pub compress: bool,
    pub options: Vec<String>,
    pub no_create: bool,
    pub cache: Option<String>,
    pub src_cache: Option<String>,
    pub backing: Option<String>,
    pub src: String,
    pub dst: String,
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting initialised bytes as u64 is valid for any bit pattern.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

pub fn convert(a: &ConvertArgs) -> Result<i32, Error> {
    let src_cache = Cache::parse(a.src_cache.as_deref().unwrap_or("writeback"))?;
    let dst_cache = Cache::parse(a.cache.as_deref().unwrap_or("unsafe"))?;
    let src = Image::open(Path::new(&a.src), a.fmt.as_deref(), false, src_cache)?;
    let size = src.size();
    let mut o = parse_options(&a.options)?;
    let dst_path = Path::new(&a.dst);
    if a.backing.is_some() {
        o.qcow2.backing_file = a.backing.clone();
    }
    if !a.no_create {
        match a.out_fmt.as_str() {
            "qcow2" => {
                o.qcow2.size = size;
                create_qcow2(dst_path, &o.qcow2)?;
            }
            "raw" => {
                if a.compress {
                    return Err(Error::msg("Compression not supported for this file format"));
                }
                create_raw(dst_path, size, o.prealloc)?;
            }
            f => return Err(Error::msg(format!("Unknown file format '{f}'"))),
        }
    }
    let dst = Image::open_opts(
        dst_path,
        Some(&a.out_fmt),
        true,
        dst_cache,
        a.backing.is_none(),
    )?;
    let fresh = !a.no_create && o.prealloc == Preallocation::Off;
    let gran: u64 = match &dst {
        Image::Qcow2(q) => q.cluster_size(),
        Image::Raw(_) => 4096,
    };
    let chunk = if a.compress {
        gran.max(64 << 10).div_ceil(gran) * gran
    } else {
        CHUNK.max(gran)
    };
    let next = AtomicU64::new(0);
    let err: Mutex<Option<Error>> = Mutex::new(None);
    let backing_copy = a.backing.is_some();
    let fail = |e: Error| {
        let mut g = err.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    };
    if a.compress {
        // Compression is CPU-bound: workers take chunks in turn.
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    let mut buf = vec![0u8; chunk as usize];
                    loop {
                        let off = next.fetch_add(chunk, Ordering::Relaxed);
                        if off >= size || err.lock().map(|e| e.is_some()).unwrap_or(true) {
                            return;
                        }
                        let len = chunk.min(size - off);
                        if let Err(e) = convert_chunk(
                            &src,
                            &dst,
                            off,
                            len,
                            &mut buf,
                            gran,
                            fresh,
                            true,
                            backing_copy,
                        ) {
                            fail(e);
                            return;
                        }
                    }
                });
            }
        });
    } else {
        // Copies are memcpy-bound: one thread reads while another writes.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (src, dst, fail) = (&src, &dst, &fail);
        std::thread::scope(|sc| {
            sc.spawn(move || {
                let mut off = 0u64;
                while off < size {
                    let len = chunk.min(size - off);
                    let r = (|| -> Result<(), Error> {
                        let mut pos = off;
                        while pos < off + len {
                            let st = src.block_status(pos, off + len - pos)?;
                            let n = st.len.max(1).min(off + len - pos);
                            let skip = (st.zero && !st.data) || (backing_copy && !st.allocated);
                            if skip {
                                if !fresh && !backing_copy {
                                    dst.write_zeroes(pos, n)?;
                                }
                            } else {
                                let mut b = back_rx.try_recv().unwrap_or_default();
                                b.resize(n as usize, 0);
                                src.read_at(&mut b, pos)?;
                                if tx.send((pos, b)).is_err() {
                                    return Ok(());
                                }
                            }
                            pos += n;
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        fail(e);
                        return;
                    }
                    off += len;
                }
                drop(tx);
            });
            sc.spawn(move || {
                for (pos, b) in rx.iter() {
                    if let Err(e) = write_nonzero(dst, &b, pos, gran, fresh, false) {
                        fail(e);
                        return;
                    }
                    let _ = back_tx.send(b);
                }
            });
        });
    }
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    dst.flush()?;
    if let Image::Qcow2(q) = &dst {
        q.close()?;
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn convert_chunk(
    src: &Image,
    dst: &Image,
    off: u64,
    len: u64,
    buf: &mut [u8],
    gran: u64,
    fresh: bool,
    compress: bool,
    keep_unallocated: bool,
) -> Result<(), Error> {
    if compress {
        // Whole clusters: compressing partial ones would store them uncompressed.
        let st = src.block_status(off, len)?;
        if st.len >= len && st.zero && !st.data && fresh {
            return Ok(());
        }
        let b = &mut buf[..len as usize];
        src.read_at(b, off)?;
        return write_nonzero(dst, b, off, gran, fresh, compress);
    }
    // Skip what reads as zero in the source without reading it.
    let mut pos = off;
    while pos < off + len {
        let st = src.block_status(pos, off + len - pos)?;
        let n = st.len.max(1).min(off + len - pos);
        let skip = (st.zero && !st.data) || (keep_unallocated && !st.allocated);
        if skip {
            if !fresh && !keep_unallocated {
                dst.write_zeroes(pos, n)?;
            }
        } else {
            let b = &mut buf[..n as usize];
            src.read_at(b, pos)?;
            write_nonzero(dst, b, pos, gran, fresh, compress)?;
        }
        pos += n;
    }
    Ok(())
}

fn write_nonzero(
    dst: &Image,
    b: &[u8],
    off: u64,
    gran: u64,
    fresh: bool,
    compress: bool,
) -> Result<(), Error> {
    if compress {
        let Image::Qcow2(q) = dst else {
            return Err(Error::msg("Compression not supported for this file format"));
        };
        let cs = q.cluster_size();
        let mut o = 0usize;
        while o < b.len() {
            let g = off + o as u64;
            let end = ((g / cs + 1) * cs).min(off + b.len() as u64);
            let piece = &b[o..(end - off) as usize];
            if !is_zero(piece) || !fresh {
                if g % cs == 0 && (piece.len() as u64 == cs || end == q.size()) {
                    q.write_compressed(piece, g)?;
                } else {
                    q.write_at(piece, g)?;
                }
            }
            o = (end - off) as usize;
        }
        return Ok(());
    }
    // Write runs of granules that are not all zero.
    let mut o = 0usize;
    let n = b.len();
    while o < n {
        let g = off + o as u64;
        let gend = (((g / gran) + 1) * gran - off).min(n as u64) as usize;
        let zero = is_zero(&b[o..gend]);
        let mut e = gend;
        while e < n {
            let ge = (((off + e as u64) / gran + 1) * gran - off).min(n as u64) as usize;
            if is_zero(&b[e..ge]) != zero {
                break;
            }
            e = ge;
        }
        if !zero {
            dst.write_at(&b[o..e], g)?;
        } else if !fresh {
            dst.write_zeroes(g, (e - o) as u64)?;
        }
        o = e;
    }
    Ok(())
}

pub fn compare(
    fmt1: Option<&str>,
    fmt2: Option<&str>,
    strict: bool,
    quiet: bool,
    a: &str,
    b: &str,
) -> Result<i32, Error> {
    let (ia, ib) = match (
        Image::open(Path::new(a), fmt1, false, Cache::Writeback),
        Image::open(Path::new(b), fmt2, false, Cache::Writeback),
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm-img: {e}");
            return Ok(2);
        }
    };
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let (sa, sb) = (ia.size(), ib.size());
    if strict && sa != sb {
        say("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    let common = sa.min(sb);
    let chunk = 1u64 << 20;
    let mut ba = vec![0u8; chunk as usize];
    let mut bb = vec![0u8; chunk as usize];
    let mut off = 0u64;
    while off < common {
        let n = chunk.min(common - off) as usize;
        let za = ia.block_status(off, n as u64)?;
        let zb = ib.block_status(off, n as u64)?;
        if za.zero && !za.data && zb.zero && !zb.data {
            off += za.len.min(zb.len).max(512);
            continue;
        }
        ia.read_at(&mut ba[..n], off)?;
        ib.read_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            let first = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            say(format!(
                "Content mismatch at offset {}!",
                off + (first as u64 / 512 * 512)
            ));
            return Ok(1);
        }
        off += n as u64;
    }
    let (longer, end) = if sa > sb { (&ia, sa) } else { (&ib, sb) };
    let mut off = common;
    while off < end {
        let n = chunk.min(end - off) as usize;
        longer.read_at(&mut ba[..n], off)?;
        if let Some(p) = ba[..n].iter().position(|&x| x != 0) {
            say(format!(
                "Content mismatch at offset {}!",
                off + (p as u64 / 512 * 512)
            ));
            return Ok(1);
        }
        off += n as u64;
    }
    say("Images are identical.".into());
    Ok(0)
}

pub fn rebase(
    fmt: Option<&str>,
    backing: &str,
    backing_fmt: Option<&str>,
    unsafe_: bool,
    filename: &str,
) -> Result<i32, Error> {
    let path = Path::new(filename);
    let img = Image::open_opts(path, fmt, true, Cache::Writeback, unsafe_)?;
    let q = img.qcow2("Rebase")?.clone();
    let new_name = (!backing.is_empty()).then_some(backing);
    let new_img: Option<Image> = match new_name {
        Some(n) if !unsafe_ => {
            let p = qcow2::backing::resolve_relative(n, Some(path));
            Some(Image::open(&p, backing_fmt, false, Cache::Writeback)?)
        }
        _ => None,
    };
    let fmt_name = backing_fmt
        .map(str::to_string)
        .or_else(|| new_img.as_ref().map(|i| i.format().to_string()));
    if !unsafe_ {
        let size = q.size();
        let cs = q.cluster_size().max(64 << 10);
        let mut old = vec![0u8; cs as usize];
        let mut new = vec![0u8; cs as usize];
        let mut off = 0u64;
        while off < size {
            let n = cs.min(size - off);
            let st = q.map(off, n)?;
            let m = st.len;
            if st.kind == qcow2::MappingKind::Unallocated {
                let o = &mut old[..m as usize];
                q.read_at(o, off)?;
                let nb = &mut new[..m as usize];
                match &new_img {
                    Some(ni) => qcow2::backing::read_clamped(&*ni.reader(), nb, off)?,
                    None => nb.fill(0),
                }
                if o != nb {
                    q.write_at(o, off)?;
                }
            }
            off += m;
        }
    }
    q.set_backing(new_name, fmt_name.as_deref(), new_img.map(|i| i.reader()))?;
    q.close()?;
    Ok(0)
}

pub fn commit(
    fmt: Option<&str>,
    base: Option<&str>,
    keep: bool,
    quiet: bool,
    filename: &str,
) -> Result<i32, Error> {
    let path = Path::new(filename);
    let img = Image::open(path, fmt, true, Cache::Writeback)?;
    let q = img.qcow2("Commit")?.clone();
    let h = q.header();
    let bname = h
        .backing_file
        .clone()
        .ok_or_else(|| Error::msg("Image does not have a backing file"))?;
    let bpath = qcow2::backing::resolve_relative(&bname, Some(path));
    if let Some(b) = base {
        let want = Path::new(b).canonicalize()?;
        if want != bpath.canonicalize()? {
            return Err(Error::msg(
                "only committing into the immediate backing file is supported",
            ));
        }
    }
    let target = Image::open(&bpath, h.backing_format.as_deref(), true, Cache::Writeback)?;
    let size = q.size().min(target.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        let m = q.map(off, CHUNK.min(size - off))?;
        if m.kind != qcow2::MappingKind::Unallocated {
            let b = &mut buf[..m.len as usize];
            q.read_at(b, off)?;
            if is_zero(b) {
                target.write_zeroes(off, m.len)?;
            } else {
                target.write_at(b, off)?;
            }
        }
        off += m.len;
    }
    target.flush()?;
    if let Image::Qcow2(t) = &target {
        t.close()?;
    }
    if !keep {
        q.make_empty()?;
    }
    q.close()?;
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}
