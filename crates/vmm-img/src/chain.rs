//! compare, rebase and commit: the commands that work along a backing chain.

use std::path::Path;

use crate::convert::{is_zero, CHUNK};
use crate::img::{Cache, Image};
use crate::Error;

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
