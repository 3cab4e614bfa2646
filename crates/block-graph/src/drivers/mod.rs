//! The drivers and the context they are opened in.

pub mod blkdebug;
pub mod copy_before_write;
pub mod file;
pub mod null;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod throttle;

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use qapi_types::{
    BlockdevOptions, BlockdevOptionsBranch, BlockdevRef, BlockdevRefOrNull, QapiType,
};

use crate::bitmap::DirtyBitmap;
use crate::driver::BlockDriver;
use crate::error::{BlockError, Result};
use crate::events::EventQueue;
use crate::graph::BlockGraph;
use crate::node::{ChildSlot, Edge, Node, NodeOptions};
use crate::options::Inherit;
use crate::perm::{default_child_perm, ChildRole, Perm};

/// What an open leaves for the node: its children, backing slot and the cell the node is
/// published in.
pub(crate) type OpenedParts = (Vec<Arc<Edge>>, Arc<ChildSlot>, Arc<OnceLock<Weak<Node>>>);

/// Where a driver's open function gets its children and learns about its node.
pub struct OpenCtx<'a> {
    graph: &'a mut BlockGraph,
    node_name: String,
    opts: NodeOptions,
    events: Arc<EventQueue>,
    children: Vec<Arc<Edge>>,
    backing: Arc<ChildSlot>,
    node_cell: Arc<OnceLock<Weak<Node>>>,
}

impl<'a> OpenCtx<'a> {
    pub(crate) fn new(
        graph: &'a mut BlockGraph,
        node_name: String,
        opts: NodeOptions,
        events: Arc<EventQueue>,
    ) -> Self {
        OpenCtx {
            graph,
            node_name,
            opts,
            events,
            children: Vec::new(),
            backing: Arc::new(ChildSlot::default()),
            node_cell: Arc::new(OnceLock::new()),
        }
    }

    pub(crate) fn finish(self) -> OpenedParts {
        (self.children, self.backing, self.node_cell)
    }

    /// The name of the node being opened.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Its generic options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// The queue for events the driver raises (corruption).
    pub fn events(&self) -> Arc<EventQueue> {
        self.events.clone()
    }

    /// The node once it exists (for callbacks that run later, such as corruption reports).
    pub fn node_cell(&self) -> Arc<OnceLock<Weak<Node>>> {
        self.node_cell.clone()
    }

    /// The backing slot of the node: the graph fills it after the driver is open.
    pub fn backing_slot(&self) -> Arc<ChildSlot> {
        self.backing.clone()
    }

    /// Opens (or, for a reference, finds) the child `name` in `role` and attaches it with
    /// the permissions the role implies, refusing conflicts.
    pub fn open_child(
        &mut self,
        name: &str,
        r: &BlockdevRef,
        role: ChildRole,
    ) -> Result<Arc<Edge>> {
        let node = match r {
            BlockdevRef::Reference(s) if s.is_empty() => {
                return Err(BlockError::generic(format!(
                    "A block device must be specified for \"{name}\""
                )))
            }
            BlockdevRef::Reference(s) => self.graph.lookup_either(s)?,
            BlockdevRef::Definition(o) => {
                let inh = Inherit::for_child(&self.opts, role);
                self.graph.open_node(o, &inh, false)?
            }
        };
        self.attach(name, node, role)
    }

    /// Attaches an existing node as child `name`.
    pub fn attach(&mut self, name: &str, node: Arc<Node>, role: ChildRole) -> Result<Arc<Edge>> {
        let (p, mut s) = default_child_perm(role, Perm::NONE, Perm::ALL, !self.opts.read_only);
        if self.opts.force_share {
            s = Perm::ALL;
        }
        let e = Edge::new_for(name, role, node, p, s, Some(self.node_name.clone()));
        if let Err(err) = self.graph.refresh_perms() {
            drop(e);
            let _ = self.graph.refresh_perms();
            return Err(err);
        }
        self.children.push(e.clone());
        Ok(e)
    }
}

fn unsupported(d: &str) -> BlockError {
    BlockError::generic(format!("Driver '{d}' is not supported by this block layer"))
}

fn non_negative(v: Option<i64>, name: &str) -> Result<Option<u64>> {
    match v {
        Some(x) if x < 0 => Err(BlockError::generic(format!(
            "Parameter '{name}' expects a non-negative number below 2^64"
        ))),
        Some(x) => Ok(Some(x as u64)),
        None => Ok(None),
    }
}

/// Opens the driver named by `opts.driver`.
pub(crate) fn open_driver(
    ctx: &mut OpenCtx<'_>,
    opts: &BlockdevOptions,
) -> Result<Box<dyn BlockDriver>> {
    match &opts.driver {
        BlockdevOptionsBranch::File(f) | BlockdevOptionsBranch::HostDevice(f) => {
            let locking = match &f.locking {
                None | Some(qapi_types::OnOffAuto::Auto) | Some(qapi_types::OnOffAuto::On) => true,
                Some(qapi_types::OnOffAuto::Off) => false,
                Some(qapi_types::OnOffAuto::Unrecognized(v)) => {
                    return Err(BlockError::generic(format!(
                        "Parameter 'locking' does not accept value '{v}'"
                    )))
                }
            };
            let d = file::FileDriver::open(&file::FileOptions {
                filename: f.filename.clone(),
                read_only: ctx.options().read_only,
                direct: ctx.options().cache_direct,
                locking,
                io_uring: ctx.options().aio == crate::node::Aio::IoUring,
            })?;
            Ok(Box::new(d))
        }
        BlockdevOptionsBranch::NullCo(n) | BlockdevOptionsBranch::NullAio(n) => {
            let name = if matches!(opts.driver, BlockdevOptionsBranch::NullCo(_)) {
                "null-co"
            } else {
                "null-aio"
            };
            let size = non_negative(n.size, "size")?.unwrap_or(1 << 30);
            let mut given = Vec::new();
            if let Some(s) = n.size {
                given.push(("size", serde_json::json!(s)));
            }
            // `latency-ns` changes no data: QEMU leaves it out of the file name (its
            // null_strong_runtime_opts are size and read-zeroes).
            if let Some(z) = n.read_zeroes {
                given.push(("read-zeroes", serde_json::json!(z)));
            }
            Ok(Box::new(null::NullDriver {
                name,
                size,
                latency: Duration::from_nanos(n.latency_ns.unwrap_or(0)),
                read_zeroes: n.read_zeroes.unwrap_or(false),
                given,
                node: ctx.node_cell(),
            }))
        }
        BlockdevOptionsBranch::Raw(r) => {
            let offset = non_negative(r.offset, "offset")?.unwrap_or(0);
            let size = non_negative(r.size, "size")?;
            let role = raw::RawDriver::file_role(offset, size);
            let file = ctx.open_child("file", &r.file, role)?;
            Ok(Box::new(raw::RawDriver::new(file, offset, size)?))
        }
        BlockdevOptionsBranch::Qcow2(q) => qcow2::open(ctx, q),
        BlockdevOptionsBranch::CopyBeforeWrite(c) => copy_before_write::open(ctx, c),
        BlockdevOptionsBranch::Throttle(t) => Ok(Box::new(throttle::ThrottleDriver::open(
            ctx,
            &t.throttle_group,
            &t.file,
        )?)),
        BlockdevOptionsBranch::Blkdebug(b) => blkdebug::open(ctx, b),
        BlockdevOptionsBranch::Quorum(q) => quorum::open(ctx, q),
        BlockdevOptionsBranch::Blkverify(b) => quorum::open_blkverify(ctx, b),
        BlockdevOptionsBranch::Unrecognized(d) => {
            Err(BlockError::generic(format!("Unknown driver '{d}'")))
        }
        other => Err(unsupported(other.discriminant().as_str())),
    }
}

/// The `backing` option of a format's options (`None`: the format has none).
fn backing_option(o: &BlockdevOptions) -> Option<Option<&BlockdevRefOrNull>> {
    match &o.driver {
        BlockdevOptionsBranch::Qcow2(q) => Some(q.backing.as_ref()),
        BlockdevOptionsBranch::Qcow(q)
        | BlockdevOptionsBranch::Qed(q)
        | BlockdevOptionsBranch::Vmdk(q) => Some(q.backing.as_ref()),
        _ => None,
    }
}

/// Reverts `node` to the internal snapshot with this id or name (QEMU's
/// `bdrv_snapshot_goto`): refused while the node has dirty bitmaps, else the driver's
/// [`BlockDriver::snapshot_goto`] (filters forward it to their child through this function,
/// so each node on the way is checked). Driver failures read as QEMU's `Failed to load
/// snapshot: ...`. The caller has flushed and drained the node; its cached length is not
/// refreshed, so a graph whose snapshot had another disk size is closed afterwards.
pub fn snapshot_goto(node: &Node, id_or_name: &str) -> Result<()> {
    if !node.bitmaps().is_empty() {
        return Err(BlockError::io(
            libc::EBUSY,
            "Device has active dirty bitmaps",
        ));
    }
    node.driver().snapshot_goto(id_or_name)
}

/// The image information QEMU's `bdrv_get_info` gives for a node whose driver asks its
/// child (`raw`, and filters through their filtered child): the child's dirty flag, which
/// is absent when the child has no information either (`null-co`).
pub(crate) fn info_of_child(child: &Edge) -> crate::driver::DriverImageInfo {
    // QEMU's bdrv_get_info of a filter (and raw_co_get_info) answers with the child's
    // BlockDriverInfo: its cluster size and dirty flag, nothing format-specific.
    let info = child.node().driver().image_info();
    crate::driver::DriverImageInfo {
        cluster_size: info.cluster_size,
        dirty_flag: info.dirty_flag,
        ..Default::default()
    }
}

/// Host bytes allocated for the node (QEMU's `bdrv_get_allocated_file_size`): its driver's
/// answer, else its primary child's; `None` when nobody below knows.
pub(crate) fn allocated_size_of(n: &Node) -> Option<u64> {
    n.driver()
        .allocated_size()
        .or_else(|| n.primary_child().and_then(|c| allocated_size_of(&c.node())))
}

/// The node's file name as QEMU shows it (see [`crate::filename`]).
pub fn node_filename(n: &Node) -> String {
    crate::filename::node_filename(n)
}

/// Guesses a format from the first bytes of a file (qcow2 magic, else raw).
pub fn probe_format(path: &str) -> Result<&'static str> {
    ::qcow2::backing::probe_format(std::path::Path::new(path))
        .map_err(|e| BlockError::from(e).prepend(&format!("Could not open '{path}'")))
}

impl BlockGraph {
    /// Opens the backing node `node`'s options (or image header) ask for.
    pub(crate) fn open_backing_from_options(
        &mut self,
        node: &Arc<Node>,
        opts: &BlockdevOptions,
    ) -> Result<()> {
        let choice = backing_option(opts).flatten();
        let target = match choice {
            Some(BlockdevRefOrNull::Null(_)) => return Ok(()),
            Some(BlockdevRefOrNull::Reference(s)) if s.is_empty() => return Ok(()),
            Some(BlockdevRefOrNull::Reference(s)) => self.lookup_either(s)?,
            Some(BlockdevRefOrNull::Definition(o)) => {
                let inh = Inherit::for_child(node.options(), ChildRole::Cow);
                self.open_node(o, &inh, false)?
            }
            None => {
                let Some((name, fmt)) = node.driver().backing_file() else {
                    return Ok(());
                };
                self.open_implicit_backing(node, &name, fmt.as_deref())
                    .map_err(|e| e.prepend("Could not open backing file"))?
            }
        };
        self.set_backing(node, Some(&target))
    }

    fn open_implicit_backing(
        &mut self,
        node: &Arc<Node>,
        name: &str,
        fmt: Option<&str>,
    ) -> Result<Arc<Node>> {
        let base = crate::filename::base_filename(node);
        let full = full_backing_filename(&base, name)?;
        let fmt = match fmt {
            Some(f) => f.to_string(),
            None => probe_format(&full)?.to_string(),
        };
        let v = serde_json::json!({
            "driver": fmt,
            "file": {"driver": "file", "filename": full},
        });
        let o =
            BlockdevOptions::from_qmp_strict(v).map_err(|e| BlockError::generic(e.to_string()))?;
        let inh = Inherit::for_child(node.options(), ChildRole::Cow);
        self.open_node(&o, &inh, false)
    }
}

/// Resolves a backing file name against the image that names it (QEMU's
/// `bdrv_get_full_backing_filename_from_filename`).
pub fn full_backing_filename(backed: &str, backing: &str) -> Result<String> {
    if backing.starts_with('/') || has_protocol(backing) {
        return Ok(backing.to_string());
    }
    if backed.is_empty() || backed.starts_with("json:") || has_protocol(backed) {
        return Err(BlockError::generic(format!(
            "Cannot use relative backing file names for '{backed}'"
        )));
    }
    Ok(match backed.rfind('/') {
        Some(i) => format!("{}{}", &backed[..=i], backing),
        None => backing.to_string(),
    })
}

fn has_protocol(p: &str) -> bool {
    let end = p.find(['/', ':']).unwrap_or(p.len());
    p[end..].starts_with(':')
}

/// Loads the persistent bitmaps of a freshly opened node.
pub(crate) fn load_persistent_bitmaps(node: &Arc<Node>) -> Result<()> {
    if !node.driver().supports_persistent_bitmaps() {
        return Ok(());
    }
    for s in node.driver().load_bitmaps()? {
        let bm = DirtyBitmap::from_stored(&s, node.length())?;
        node.add_bitmap(Arc::new(bm))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_like_qemu() {
        assert_eq!(
            full_backing_filename("/a/b/top.qcow2", "base.qcow2").unwrap(),
            "/a/b/base.qcow2"
        );
        assert_eq!(
            full_backing_filename("/a/top", "/x/base").unwrap(),
            "/x/base"
        );
        assert_eq!(full_backing_filename("top", "base").unwrap(), "base");
        assert_eq!(
            full_backing_filename("null-co://", "base")
                .unwrap_err()
                .to_string(),
            "Cannot use relative backing file names for 'null-co://'"
        );
    }
}
