//! compare, rebase and commit: the commands that work along a backing chain, with qemu-img's
//! algorithms (so that `-p` prints what qemu-img prints and results match).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2::{BlockRead, BlockStatus, FollowFiles, OpenOptions, Qcow2};

use crate::convert::is_zero;
use crate::graph_img::{reduce, Plain, Source};
use crate::img::{Cache, Image};
use crate::progress::Progress;
use crate::Error;

/// qemu-img's IO_BUF_SIZE.
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Arguments of `compare`.
pub struct CompareArgs<'a> {
    pub fmt1: Option<&'a str>,
    pub fmt2: Option<&'a str>,
    pub cache: Option<&'a str>,
    pub strict: bool,
    pub quiet: bool,
    pub progress: bool,
    pub a: &'a str,
    pub b: &'a str,
    /// `--image-opts`: both names are key=value option strings.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
}

/// First sector of `b` holding a non-zero byte (qemu's `find_nonzero`).
fn find_nonzero(b: &[u8]) -> Option<usize> {
    b.chunks(SECTOR)
        .position(|s| !is_zero(s))
        .map(|i| i * SECTOR)
}

/// Exit codes of compare: 0 identical, 1 different, 2 open error, 3 block status error,
/// 4 read error.
pub fn compare(a: &CompareArgs<'_>) -> Result<i32, Error> {
    let progress = Progress::new(a.progress && !a.quiet, 2.0);
    let r = compare_inner(a, &progress);
    progress.end();
    r
}

fn compare_inner(a: &CompareArgs<'_>, progress: &Progress) -> Result<i32, Error> {
    let say = |s: String| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let cache = a.cache.unwrap_or("writeback");
    let Ok(cache) = Cache::parse(cache) else {
        eprintln!("vmm-img: Invalid source cache option: {cache}");
        return Ok(2);
    };
    let src = |name, fmt| Source::new(name, fmt, a.image_opts, a.force_share);
    let (ia, ib) = match (
        Image::open_source(&src(a.a, a.fmt1), false, cache),
        Image::open_source(&src(a.b, a.fmt2), false, cache),
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vmm-img: {e}");
            return Ok(2);
        }
    };
    let (sa, sb) = (ia.size(), ib.size());
    let total = sa.min(sb);
    let base = sa.max(sb) as f32;
    progress.start();
    if a.strict && sa != sb {
        say("Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    let status = |img: &Image, name: &str, off: u64, len: u64| {
        img.block_status(off, len).map_err(|_| {
            eprintln!("vmm-img: Sector allocation test failed for {name}");
            3
        })
    };
    let read = |img: &Image, name: &str, buf: &mut [u8], off: u64| {
        img.read_at(buf, off).map_err(|e| {
            let e = match e {
                Error::Read { source, .. } => source.to_string(),
                e => e.to_string(),
            };
            eprintln!("vmm-img: Error while reading offset {off} of {name}: {e}");
            4
        })
    };
    let mut b1 = vec![0u8; IO_BUF as usize];
    let mut b2 = vec![0u8; IO_BUF as usize];
    let mut off = 0u64;
    while off < total {
        let step = (|| -> Result<Option<u64>, i32> {
            let s1 = status(&ia, a.a, off, sa - off)?;
            let s2 = status(&ib, a.b, off, sb - off)?;
            let mut chunk = s1.len.min(s2.len).max(1);
            let (eof1, eof2) = (off + s1.len >= sa, off + s2.len >= sb);
            if a.strict && !same_status(&s1, eof1, &s2, eof2) {
                say(format!("Strict mode: Offset {off} block status mismatch!"));
                return Ok(None);
            }
            if s1.zero && s2.zero {
                // Both read as zero.
            } else if s1.allocated == s2.allocated {
                if s1.allocated {
                    chunk = chunk.min(IO_BUF);
                    let n = chunk as usize;
                    read(&ia, a.a, &mut b1[..n], off)?;
                    read(&ib, a.b, &mut b2[..n], off)?;
                    if let Some(p) = b1[..n]
                        .chunks(SECTOR)
                        .zip(b2[..n].chunks(SECTOR))
                        .position(|(x, y)| x != y)
                    {
                        say(format!(
                            "Content mismatch at offset {}!",
                            off + (p * SECTOR) as u64
                        ));
                        return Ok(None);
                    }
                }
            } else {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                let (img, name) = if s1.allocated { (&ia, a.a) } else { (&ib, a.b) };
                read(img, name, &mut b1[..n], off)?;
                if let Some(p) = find_nonzero(&b1[..n]) {
                    say(format!("Content mismatch at offset {}!", off + p as u64));
                    return Ok(None);
                }
            }
            Ok(Some(chunk))
        })();
        match step {
            Ok(Some(chunk)) => {
                off += chunk;
                progress.add(chunk as f32 / base * 100.0, 100.0);
            }
            Ok(None) => return Ok(1),
            Err(code) => return Ok(code),
        }
    }
    if sa != sb {
        say("Warning: Image size mismatch!".into());
        let (over, name, end) = if sa > sb {
            (&ia, a.a, sa)
        } else {
            (&ib, a.b, sb)
        };
        while off < end {
            let st = match status(over, name, off, end - off) {
                Ok(s) => s,
                Err(code) => return Ok(code),
            };
            let mut chunk = st.len.max(1);
            if st.allocated && !st.zero {
                chunk = chunk.min(IO_BUF);
                let n = chunk as usize;
                if let Err(code) = read(over, name, &mut b1[..n], off) {
                    return Ok(code);
                }
                if let Some(p) = find_nonzero(&b1[..n]) {
                    say(format!("Content mismatch at offset {}!", off + p as u64));
                    return Ok(1);
                }
            }
            off += chunk;
            progress.add(chunk as f32 / base * 100.0, 100.0);
        }
    }
    say("Images are identical.".into());
    Ok(0)
}

/// Whether two block statuses agree for `compare -s` (allocation, zero, data, and whether a
/// host offset is known).
/// Whether two block statuses are equal as strict compare sees them: QEMU compares the
/// whole flag word, which includes `BDRV_BLOCK_EOF` for an answer that reaches the end of
/// its image (`eof_a`, `eof_b`).
fn same_status(a: &BlockStatus, eof_a: bool, b: &BlockStatus, eof_b: bool) -> bool {
    (a.allocated, a.zero, a.data, a.offset.is_some(), eof_a)
        == (b.allocated, b.zero, b.data, b.offset.is_some(), eof_b)
}

/// Arguments of `rebase`.
pub struct RebaseArgs<'a> {
    pub fmt: Option<&'a str>,
    pub backing: &'a str,
    pub backing_fmt: Option<&'a str>,
    pub unsafe_: bool,
    pub cache: Option<&'a str>,
    pub src_cache: Option<&'a str>,
    pub quiet: bool,
    pub progress: bool,
    pub filename: &'a str,
}

pub fn rebase(a: &RebaseArgs<'_>) -> Result<i32, Error> {
    let progress = Progress::new(a.progress && !a.quiet, 2.0);
    progress.start();
    let r = rebase_inner(a, &progress);
    progress.end();
    r
}

fn rebase_inner(a: &RebaseArgs<'_>, progress: &Progress) -> Result<i32, Error> {
    let cache = Cache::parse(a.cache.unwrap_or("writeback"))?;
    let sc = a.src_cache.unwrap_or("writeback");
    let src_cache =
        Cache::parse(sc).map_err(|_| Error::msg(format!("Invalid source cache option: {sc}")))?;
    let path = Path::new(a.filename);
    let img = Image::open_opts(path, a.fmt, true, cache, a.unsafe_)?;
    if let Image::Graph(_) = &img {
        return Err(Error::msg(format!(
            "Could not change the backing file to '{}': Operation not supported",
            a.backing
        )));
    }
    let q = img.qcow2("Rebase")?.clone();
    let new_name = (!a.backing.is_empty()).then_some(a.backing);
    let new_img: Option<Image> = match new_name {
        Some(n) if !a.unsafe_ => {
            let p = qcow2::backing::resolve_relative(n, Some(path));
            Some(
                Image::open(&p, a.backing_fmt, false, src_cache).map_err(|e| {
                    Error::msg(format!("Could not open new backing file '{n}': {e}"))
                })?,
            )
        }
        _ => None,
    };
    let fmt_name = a
        .backing_fmt
        .map(str::to_string)
        .or_else(|| new_img.as_ref().map(|i| i.format().to_string()));
    if !a.unsafe_ {
        let size = q.size();
        let old_size = q.backing().map(|b| b.size()).unwrap_or(0);
        let new_size = new_img.as_ref().map(|i| i.size()).unwrap_or(0);
        let local_progress = if size != 0 {
            100.0 / (size / size.min(IO_BUF)) as f32
        } else {
            0.0
        };
        let mut old = vec![0u8; IO_BUF as usize];
        let mut new = vec![0u8; IO_BUF as usize];
        let mut off = 0u64;
        while off < size {
            let mut n = IO_BUF.min(size - off);
            // Ranges the image allocates itself do not depend on the backing file.
            let m = q.map(off, n)?;
            n = m.len;
            if m.kind != qcow2::MappingKind::Unallocated {
                off += n;
                continue;
            }
            if off < old_size {
                n = n.min(old_size - off);
            }
            if off < new_size {
                n = n.min(new_size - off);
            }
            let len = n as usize;
            // Unallocated here: the image shows the old backing file.
            q.read_at(&mut old[..len], off)?;
            match &new_img {
                Some(ni) if off < new_size => ni.read_at(&mut new[..len], off)?,
                _ => new[..len].fill(0),
            }
            // Copy the sectors where the two backing files differ.
            let mut s = 0usize;
            while s < len {
                let e = (s + SECTOR).min(len);
                let differ = old[s..e] != new[s..e];
                let mut t = e;
                while t < len {
                    let te = (t + SECTOR).min(len);
                    if (old[t..te] != new[t..te]) != differ {
                        break;
                    }
                    t = te;
                }
                if differ {
                    q.write_at(&old[s..t], off + s as u64)?;
                }
                s = t;
            }
            off += n;
            progress.add(local_progress, 100.0);
        }
    }
    q.set_backing(new_name, fmt_name.as_deref(), new_img.map(|i| i.reader()))?;
    progress.set(100.0);
    q.close()?;
    Ok(0)
}

/// Arguments of `commit`.
pub struct CommitArgs<'a> {
    pub fmt: Option<&'a str>,
    pub base: Option<&'a str>,
    pub keep: bool,
    pub quiet: bool,
    pub progress: bool,
    pub cache: Option<&'a str>,
    pub filename: &'a str,
}

/// One layer of a backing chain, as its referrer's header names it.
struct Layer {
    path: PathBuf,
    fmt: Option<String>,
}

/// The backing chain below `top` (not including it), read from the headers.
fn chain_below(top: &Path, fmt: Option<&str>) -> Result<Vec<(Layer, String)>, Error> {
    let mut out = Vec::new();
    let mut cur = Layer {
        path: top.to_path_buf(),
        fmt: fmt.map(str::to_string),
    };
    let mut seen = vec![top.canonicalize()?];
    loop {
        let img = Image::open_opts(&cur.path, cur.fmt.as_deref(), false, Cache::Writeback, true)?;
        let Image::Qcow2(q) = &img else { break };
        let h = q.header();
        let Some(name) = h.backing_file.clone() else {
            break;
        };
        let path = qcow2::backing::resolve_relative(&name, Some(&cur.path));
        let canon = path.canonicalize().map_err(|e| {
            Error::msg(format!(
                "Could not open backing file '{}': {e}",
                path.display()
            ))
        })?;
        if seen.contains(&canon) {
            return Err(Error::msg(format!(
                "Backing file '{}' creates an infinite loop.",
                path.display()
            )));
        }
        seen.push(canon);
        let next = Layer {
            path,
            fmt: h.backing_format.clone(),
        };
        out.push((
            Layer {
                path: next.path.clone(),
                fmt: next.fmt.clone(),
            },
            name,
        ));
        cur = next;
    }
    Ok(out)
}

/// Whether `given` names the layer that its referrer (at `referrer`) calls `name` and that
/// lives at `path` (qemu's `bdrv_find_backing_image`: the name as written, or the same file
/// with a relative name taken relative to the referrer's directory).
fn names_layer(given: &str, name: &str, path: &Path, referrer: &Path) -> bool {
    if given == name {
        return true;
    }
    let candidate = qcow2::backing::resolve_relative(given, Some(referrer));
    match (candidate.canonicalize(), path.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Opens the chain of `top` down to layer `base_depth`, which is opened writable; the layers
/// between read from the ones below through the handles opened here.
fn open_for_commit(
    top: &Path,
    fmt: Option<&str>,
    layers: &[(Layer, String)],
    base_depth: usize,
    cache: Cache,
    top_writable: bool,
) -> Result<(Arc<Qcow2>, Image), Error> {
    let base = &layers[base_depth - 1].0;
    let target = Image::open(&base.path, base.fmt.as_deref(), true, cache)?;
    let mut below: Arc<dyn BlockRead> = target.reader();
    let opts = |writable: bool, backing: Arc<dyn BlockRead>| OpenOptions {
        writable,
        direct: cache.direct(),
        opener: Arc::new(FollowFiles {
            direct: cache.direct(),
            ..Default::default()
        }),
        backing: Some(backing),
        ..Default::default()
    };
    for (l, _) in layers[..base_depth - 1].iter().rev() {
        if l.fmt.as_deref().is_some_and(|f| f != "qcow2") {
            return Err(Error::msg(format!(
                "'{}' has a backing file but is not a qcow2 image",
                l.path.display()
            )));
        }
        let q = Qcow2::open_path(&l.path, opts(false, below.clone()))
            .map_err(|e| Error::msg(format!("Could not open '{}': {e}", l.path.display())))?;
        below = Arc::new(q);
    }
    let _ = fmt;
    let q = Qcow2::open_path(top, opts(top_writable, below))
        .map_err(|e| Error::msg(format!("Could not open '{}': {e}", top.display())))?;
    Ok((Arc::new(q), target))
}

/// `commit`: copies what the top image and the layers above the base allocate into the base
/// (the immediate backing file, or `-b BASE` deeper in the chain, which is grown to the top's
/// size when smaller), then empties the top image unless `-d` or `-b` (which implies `-d`).
/// As with qemu-img, the layers between are left as they are.
pub fn commit(a: &CommitArgs<'_>) -> Result<i32, Error> {
    let src = Source::path(a.filename, a.fmt);
    if src.uses_graph() {
        // json: names: a plain qcow2 file is committed as such; other drivers have no
        // backing file to commit into.
        return match reduce(&src)? {
            Plain::File { path, fmt } => commit(&CommitArgs {
                filename: &path,
                fmt: Some(fmt),
                ..*a
            }),
            Plain::Other(_) => Err(Error::msg("Image does not have a backing file")),
        };
    }
    let path = Path::new(a.filename);
    let cache = a.cache.unwrap_or("writeback");
    let cache = Cache::parse(cache)?;
    let drop = a.keep || a.base.is_some();
    // qemu-img commit opens the whole chain first: its open errors come before anything.
    let _opened = Image::open_opts(path, a.fmt, false, cache, false)?;
    let layers = chain_below(path, a.fmt)?;
    if layers.is_empty() {
        return Err(Error::msg("Image does not have a backing file"));
    }
    let base_depth = match a.base {
        None => 1,
        Some(b) => {
            let mut found = None;
            let mut referrer = path.to_path_buf();
            for (i, (l, name)) in layers.iter().enumerate() {
                if names_layer(b, name, &l.path, &referrer) {
                    found = Some(i + 1);
                    break;
                }
                referrer = l.path.clone();
            }
            found.ok_or_else(|| {
                Error::msg(format!(
                    "Did not find '{b}' in the backing chain of '{}'",
                    a.filename
                ))
            })?
        }
    };
    let (top, target) = open_for_commit(path, a.fmt, &layers, base_depth, cache, !drop)?;
    let progress = Progress::new(a.progress && !a.quiet, 1.0);
    progress.start();
    let r = commit_copy(&top, &target, base_depth as u32, &progress);
    if r.is_ok() {
        progress.set(100.0);
    }
    progress.end();
    r?;
    if let Image::Qcow2(t) = &target {
        t.close()?;
    }
    if !drop {
        top.make_empty()?;
    }
    top.close()?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

fn commit_copy(
    top: &Qcow2,
    target: &Image,
    base_depth: u32,
    progress: &Progress,
) -> Result<(), Error> {
    let size = top.size();
    if target.size() < size {
        match target {
            Image::Qcow2(t) => t.resize(size, qcow2::Preallocation::Off)?,
            Image::Raw(r) => r.storage().set_len(size)?,
            Image::Graph(_) => {
                return Err(Error::msg("Image format driver does not support resize"))
            }
        }
    }
    // What the layers above the base allocate: the bytes to copy (the job's progress total).
    let above = |st: &BlockStatus| st.allocated && st.depth < base_depth;
    let mut total = 0u64;
    let mut off = 0u64;
    while off < size {
        let st = top.block_status(off, size - off)?;
        let n = st.len.max(1);
        if above(&st) {
            total += n;
        }
        off += n;
    }
    let mut buf = vec![0u8; IO_BUF as usize];
    let mut done = 0u64;
    let mut off = 0u64;
    while off < size {
        let st = top.block_status(off, (size - off).min(IO_BUF))?;
        let n = st.len.clamp(1, IO_BUF);
        if above(&st) {
            if st.zero && !st.data {
                target.write_zeroes(off, n)?;
            } else {
                let b = &mut buf[..n as usize];
                top.read_at(b, off)?;
                if is_zero(b) {
                    target.write_zeroes(off, n)?;
                } else {
                    target.write_at(b, off)?;
                }
            }
            done += n;
            progress.set(done as f32 / total as f32 * 100.0);
        }
        off += n;
    }
    target.flush()?;
    Ok(())
}
