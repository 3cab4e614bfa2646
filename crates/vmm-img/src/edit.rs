//! The subcommands that change an image in place: snapshot, resize and bitmap.

use std::path::Path;

use qcow2::{DirtyBitmap, Preallocation, Qcow2};

use crate::graph_img::{node_info, reduce, resolve, GraphImage, Plain, Source};
use crate::img::{Cache, Image};
use crate::output;
use crate::Error;

/// `snapshot` on `src` (a plain file, or a `json:` name with `-U` as given).
pub fn snapshot(
    list: bool,
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
    src: &Source<'_>,
) -> Result<i32, Error> {
    let (fmt, filename) = (src.fmt, src.name);
    let writable = create.is_some() || apply.is_some() || delete.is_some();
    // qemu-img snapshot opens the backing chain too.
    let img = Image::open_src_opts(src, writable, Cache::Writeback, false)?;
    let q = match &img {
        Image::Graph(g) => return graph_snapshot(g, list, create, apply, delete),
        Image::Raw(_) => {
            let probed = fmt.is_none().then_some(Path::new(filename));
            return raw_snapshot(create, apply, delete, probed);
        }
        Image::Qcow2(q) => q,
    };
    if let Some(n) = apply.as_deref() {
        // QEMU's bdrv_snapshot_goto refuses before looking the snapshot up.
        if !q.bitmap_list().is_empty() {
            return Err(Error::msg(format!(
                "Could not apply snapshot '{n}': Device has active dirty bitmaps"
            )));
        }
    }
    if let Some(n) = create {
        q.snapshot_create(&n)
            .map_err(|e| Error::msg(format!("Could not create snapshot '{n}': {e}")))?;
    }
    if let Some(n) = apply {
        q.snapshot_apply(&n).map_err(|e| {
            // qcow2_snapshot_goto's errno, as bdrv_snapshot_goto words it.
            Error::msg(format!(
                "Could not apply snapshot '{n}': Failed to load snapshot: {}",
                match e {
                    qcow2::Error::SnapshotNotFound(_) => "No such file or directory".to_string(),
                    qcow2::Error::Io(e) => crate::img::strerror(&e),
                    e => e.to_string(),
                }
            ))
        })?;
    }
    if let Some(n) = delete {
        q.snapshot_delete(&n).map_err(|e| {
            Error::msg(format!(
                "Could not delete snapshot '{n}': {}",
                match e {
                    qcow2::Error::SnapshotNotFound(_) => "snapshot not found".to_string(),
                    e => e.to_string(),
                }
            ))
        })?;
    }
    if list || !writable {
        let info = q.info();
        if !info.snapshots.is_empty() {
            print!(
                "Snapshot list:\n{}",
                output::snapshot_table(&info.snapshots)
            );
        }
    }
    q.close()?;
    Ok(0)
}

/// `snapshot` on a raw image: QEMU's raw driver and file protocol have no snapshots, so
/// listing shows none, creating fails with `-ENOTSUP`, applying finds no driver to ask and
/// deleting finds no snapshot. `probed` names an image whose format was probed: QEMU
/// reopens it while looking for a driver to apply a snapshot, and warns again.
fn raw_snapshot(
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
    probed: Option<&Path>,
) -> Result<i32, Error> {
    if let Some(n) = create {
        return Err(Error::msg(format!(
            "Could not create snapshot '{n}': -{} (Operation not supported)",
            libc::ENOTSUP
        )));
    }
    if let Some(n) = apply {
        if let Some(p) = probed {
            crate::img::probed_raw_warning(p);
        }
        return Err(Error::msg(format!(
            "Could not apply snapshot '{n}': Block driver does not support snapshots"
        )));
    }
    if let Some(n) = delete {
        return Err(Error::msg(format!(
            "Could not delete snapshot '{n}': snapshot not found"
        )));
    }
    Ok(0)
}

/// `snapshot` on an image opened through the graph: the snapshot calls of the format node
/// (below any filters), with qemu-img's messages for drivers without snapshots.
fn graph_snapshot(
    g: &GraphImage,
    list: bool,
    create: Option<String>,
    apply: Option<String>,
    delete: Option<String>,
) -> Result<i32, Error> {
    let mut node = g.node().clone();
    while node.driver().is_filter() {
        match node.primary_child() {
            Some(c) => node = c.node(),
            None => break,
        }
    }
    let d = node.driver();
    g.backend().flush().map_err(|e| Error::msg(e.to_string()))?;
    if let Some(n) = create {
        d.snapshot_create(&n).map_err(|e| {
            Error::msg(format!(
                "Could not create snapshot '{n}': -{} ({e})",
                e.errno_value()
            ))
        })?;
    }
    if let Some(n) = apply {
        // From the top node, as QEMU's bdrv_snapshot_goto: drivers without snapshots fall
        // back to their only data child.
        block_graph::drivers::snapshot_goto(g.node(), &n)
            .map_err(|e| Error::msg(format!("Could not apply snapshot '{n}': {e}")))?;
    }
    if let Some(n) = delete {
        let sn = d
            .snapshot_find(Some(&n), None)
            .or_else(|| d.snapshot_find(None, Some(&n)))
            .ok_or_else(|| {
                Error::msg(format!(
                    "Could not delete snapshot '{n}': snapshot not found"
                ))
            })?;
        d.snapshot_delete(&sn.id)
            .map_err(|e| Error::msg(format!("Could not delete snapshot '{n}': {e}")))?;
    }
    let info = node_info(&node, None);
    if list && !info.snapshots.is_empty() {
        print!(
            "Snapshot list:\n{}",
            output::snapshot_table(&info.snapshots)
        );
    }
    Ok(0)
}

pub fn resize(
    fmt: Option<&str>,
    shrink: bool,
    prealloc: Option<&str>,
    quiet: bool,
    filename: &str,
    size: &str,
) -> Result<i32, Error> {
    let prealloc = match prealloc {
        Some(p) => Preallocation::from_name(p)
            .ok_or_else(|| Error::msg(format!("Invalid preallocation mode: '{p}'")))?,
        None => Preallocation::Off,
    };
    let src = Source::path(filename, fmt);
    // Images that are no plain qcow2 or raw file resize through the graph.
    let graph = match src.uses_graph() {
        true => match reduce(&src)? {
            Plain::File { .. } => None,
            Plain::Other(_) => Some(GraphImage::open_resizable(&src, Cache::Writeback)?),
        },
        false => None,
    };
    // qemu-img resize opens the backing chain too.
    let img = match graph {
        Some(g) => Image::Graph(std::sync::Arc::new(g)),
        None => Image::open_opts(Path::new(filename), fmt, true, Cache::Writeback, false)?,
    };
    let cur = img.size();
    // The size as qemu-img's resize options read it (after a relative sign).
    let parse = |s: &str| crate::graph_opts::option_size("size", s);
    let new = if let Some(rest) = size.strip_prefix('+') {
        cur.checked_add(parse(rest)?)
            .ok_or_else(|| Error::msg("New image size must be positive"))?
    } else if let Some(rest) = size.strip_prefix('-') {
        cur.checked_sub(parse(rest)?)
            .ok_or_else(|| Error::msg("New image size must be positive"))?
    } else {
        parse(size)?
    };
    if new < cur && !shrink {
        // qemu-img 7.2 refuses for every format, with a warning after the error.
        return Err(Error::msg(
            "Use the --shrink option to perform a shrink operation.\n\
             vmm-img: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no \
             important data there.",
        ));
    }
    match &img {
        Image::Qcow2(q) => {
            q.resize(new, prealloc)?;
            q.close()?;
        }
        Image::Raw(r) => {
            r.storage().set_len(new)?;
        }
        Image::Graph(g) => {
            if prealloc != Preallocation::Off {
                return Err(Error::msg(
                    "Preallocation is not supported for images opened through the block graph",
                ));
            }
            g.truncate(new)?;
        }
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// Arguments of `bitmap`.
pub struct BitmapArgs {
    pub add: bool,
    pub remove: bool,
    pub clear: bool,
    pub enable: bool,
    pub disable: bool,
    pub merge: Option<String>,
    pub granularity: Option<String>,
    pub source_file: Option<String>,
    pub source_fmt: Option<String>,
    pub fmt: Option<String>,
    /// `--image-opts`: `filename` is a key=value option string.
    pub image_opts: bool,
    pub filename: String,
    pub bitmap: String,
}

pub fn bitmap(a: &BitmapArgs) -> Result<i32, Error> {
    if !(a.add || a.remove || a.clear || a.enable || a.disable || a.merge.is_some()) {
        return Err(Error::msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if a.granularity.is_some() && !a.add {
        return Err(Error::msg("granularity only supported with --add"));
    }
    // qemu-img reads -g with cvtnum while parsing its options.
    let granularity = a
        .granularity
        .as_deref()
        .map(|g| crate::img::cvtnum("granularity", g))
        .transpose()?;
    let name = &a.bitmap;
    // The first operation names the failure (qemu-img runs them in turn).
    let op = [
        (a.add, "add"),
        (a.remove, "remove"),
        (a.clear, "clear"),
        (a.enable, "enable"),
        (a.disable, "disable"),
        (a.merge.is_some(), "merge"),
    ]
    .into_iter()
    .find_map(|(on, op)| on.then_some(op))
    .unwrap_or("add");
    let fail = |op: &str, why: String| {
        Error::msg(format!("Operation {op} on bitmap {name} failed: {why}"))
    };
    let src = Source::new(&a.filename, a.fmt.as_deref(), a.image_opts, false);
    let (filename, fmt) = resolve(&src)?;
    let rsrc = Source::path(&filename, fmt.as_deref());
    // Declared first: a graph holding a qcow2 image's file outlives the image.
    let mut _file_graph = None;
    let over_graph;
    let img;
    let q: &Qcow2 = if rsrc.uses_graph() && matches!(reduce(&rsrc)?, Plain::Other("qcow2")) {
        let (q, g) = crate::graph_img::qcow2_over_graph(&rsrc, true)?;
        _file_graph = Some(g);
        over_graph = q;
        &over_graph
    } else {
        img = Image::open_opts(
            Path::new(&filename),
            fmt.as_deref(),
            true,
            Cache::Writeback,
            true,
        )?;
        match &img {
            Image::Qcow2(q) => q,
            other => {
                // No persistent bitmaps below other formats: nothing to find, nothing to add.
                if op != "add" {
                    return Err(fail(op, format!("Dirty bitmap '{name}' not found")));
                }
                let node = match other {
                    Image::Graph(g) => g.node().name().to_string(),
                    _ => {
                        drop(img);
                        let raw = Source::path(&filename, Some("raw"));
                        let g = GraphImage::open(&raw, false, Cache::Writeback, true)?;
                        g.node().name().to_string()
                    }
                };
                return Err(fail(
                    op,
                    format!("Can't store persistent bitmaps to {node}: Operation not supported"),
                ));
            }
        }
    };
    let not_found = |op: &str, b: &str| fail(op, format!("Dirty bitmap '{b}' not found"));
    if a.add {
        let g = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(fail(
                    "add",
                    "Granularity must be power of 2 and at least 512".into(),
                ))
            }
            Some(g) => g,
            None => q.cluster_size().clamp(4096, 65536),
        };
        if q.bitmap_list().iter().any(|b| &b.name == name) {
            return Err(fail("add", format!("Bitmap already exists: {name}")));
        }
        q.bitmap_store(&DirtyBitmap::new(name, g, q.size()))?;
    }
    if a.clear || a.enable || a.disable || a.merge.is_some() {
        let first = if a.clear {
            "clear"
        } else if a.enable {
            "enable"
        } else if a.disable {
            "disable"
        } else {
            "merge"
        };
        let mut bm = q.bitmap_read(name).map_err(|_| not_found(first, name))?;
        if a.clear {
            bm.bits.fill(0);
        }
        if a.enable {
            bm.flags |= qcow2::bitmap::FLAG_AUTO;
        }
        if a.disable {
            bm.flags &= !qcow2::bitmap::FLAG_AUTO;
        }
        if let Some(src) = &a.merge {
            let sb = match &a.source_file {
                Some(f) => {
                    let si = Image::open_opts(
                        Path::new(f),
                        a.source_fmt.as_deref(),
                        false,
                        Cache::Writeback,
                        true,
                    )?;
                    let sq = si.qcow2("Bitmaps")?.clone();
                    sq.bitmap_read(src).map_err(|_| not_found("merge", src))?
                }
                None => q.bitmap_read(src).map_err(|_| not_found("merge", src))?,
            };
            let nbits = (sb.bits.len() * 8) as u64;
            for i in 0..nbits {
                if sb.bits[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                    let off = i * sb.granularity;
                    if off < q.size() {
                        bm.set_range(off, sb.granularity.min(q.size() - off));
                    }
                }
            }
        }
        q.bitmap_store(&bm)?;
    }
    if a.remove {
        q.bitmap_remove(name)
            .map_err(|_| not_found("remove", name))?;
    }
    q.close()?;
    Ok(0)
}
