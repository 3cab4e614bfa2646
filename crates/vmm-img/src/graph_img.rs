//! Images opened through the block graph (`block-graph`): QEMU's `json:{...}` file names,
//! `--image-opts` option strings and drivers other than qcow2 and raw (`-f null-co`, ...).
//! [`crate::graph_opts`] turns the name into `blockdev-add`'s options, the graph opens them
//! with qemu-img's permissions, [`crate::graph_info`] shows them as qemu-img does.

use std::io::IoSliceMut;
use std::sync::{Arc, Mutex, MutexGuard};

use block_graph::options::Inherit;
use block_graph::{BlockBackend, BlockError, BlockGraph, Node, Perm, RangeStatus};
use qcow2::{BlockRead, BlockStatus};
use serde_json::{Map, Value};

use crate::graph_info::qdict_bucket;
pub use crate::graph_info::{display_filename, has_dirty_flag, node_info};
pub use crate::graph_opts::Source;
use crate::graph_opts::{block_err, legacy_tree, parse_sizes, FILE_PROTOCOLS};
use crate::img::Cache;
use crate::Error;

/// The first file name in a tree of options (the file QEMU's lock hint names).
fn first_filename(v: &Value) -> Option<&str> {
    let m = v.as_object()?;
    if let Some(f) = m.get("filename").and_then(Value::as_str) {
        return Some(f);
    }
    m.values().find_map(first_filename)
}

/// qemu-img's hint after a failed image lock.
fn lock_hint(e: Error, tree: &Value) -> Error {
    let m = e.to_string();
    match first_filename(tree) {
        Some(f) if m.starts_with("Failed to get ") && m.ends_with(" lock") => {
            Error::msg(format!("{m}\nIs another process using the image [{f}]?"))
        }
        _ => e,
    }
}

/// An image open through the block graph: the graph, the top node and the root qemu-img
/// would hold on it.
pub struct GraphImage {
    graph: Mutex<BlockGraph>,
    be: Arc<BlockBackend>,
    node: Arc<Node>,
    /// The options as the user gave them (after [`legacy_tree`]).
    given: Value,
    /// The file below the top node's primary children (what `map` names for its data).
    file: std::path::PathBuf,
}

impl GraphImage {
    /// Opens `src` (see [`legacy_tree`]) read-only or for writing, with `cache`'s
    /// `cache.direct` and `cache.no-flush` where the options do not set them.
    /// `no_backing` leaves a qcow2 top's backing file closed unless the options name one
    /// (qemu-img info's `BDRV_O_NO_BACKING`).
    pub fn open(
        src: &Source<'_>,
        writable: bool,
        cache: Cache,
        no_backing: bool,
    ) -> Result<Self, Error> {
        let perm = if writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        Self::open_perm(src, perm, cache, no_backing)
    }

    /// Opens `src` for writing and resizing (qemu-img resize's `BDRV_O_RESIZE`).
    pub fn open_resizable(src: &Source<'_>, cache: Cache) -> Result<Self, Error> {
        let perm = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
        Self::open_perm(src, perm, cache, false)
    }

    /// [`GraphImage::open`] with the permissions `perm` on the root.
    fn open_perm(
        src: &Source<'_>,
        perm: Perm,
        cache: Cache,
        no_backing: bool,
    ) -> Result<Self, Error> {
        let writable = perm.contains(Perm::WRITE);
        let wrap = |e: Error| Error::msg(format!("Could not open '{}': {e}", src.name));
        if src.image_opts && src.fmt.is_some() {
            return Err(Error::msg(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        let mut tree = legacy_tree(src).map_err(wrap)?;
        let given = tree.clone();
        parse_sizes(&mut tree).map_err(wrap)?;
        if let Value::Object(m) = &mut tree {
            m.entry("read-only").or_insert(Value::Bool(!writable));
            if no_backing && m.get("driver").and_then(Value::as_str) == Some("qcow2") {
                m.entry("backing").or_insert(Value::Null);
            }
            if src.force_share {
                m.entry("force-share").or_insert(Value::Bool(true));
            }
            let c = m
                .entry("cache")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(c) = c {
                c.entry("direct").or_insert(Value::Bool(cache.direct()));
                c.entry("no-flush")
                    .or_insert(Value::Bool(cache == Cache::Unsafe));
            }
        }
        let opts =
            block_graph::cli::blockdev_options_from_tree(tree).map_err(|e| wrap(block_err(e)))?;
        let mut graph = BlockGraph::new();
        let node = graph
            .open_node(&opts, &Inherit::top(), false)
            .map_err(|e| wrap(lock_hint(block_err(e), &given)))?;
        let shared = if src.force_share {
            Perm::ALL
        } else {
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        };
        let be = graph
            .new_root(&node, perm, shared, "qemu-img")
            .map_err(|e| wrap(lock_hint(block_err(e), &given)))?;
        log::debug!(
            "opened '{}' through the graph ({})",
            src.name,
            node.driver_name()
        );
        let file = file_below(&node).into();
        Ok(GraphImage {
            graph: Mutex::new(graph),
            be,
            node,
            given,
            file,
        })
    }

    /// The top node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// qemu-img info opens images without their backing files (`BDRV_O_NO_BACKING`), so
    /// backing options in the name are left over: QEMU refuses the first one it meets.
    pub fn refuse_backing_options(&self, name: &str) -> Result<(), Error> {
        fn keys(prefix: String, v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, x) in m {
                        keys(format!("{prefix}.{k}"), x, out);
                    }
                }
                Value::Array(a) => {
                    for (i, x) in a.iter().enumerate() {
                        keys(format!("{prefix}.{i}"), x, out);
                    }
                }
                _ => out.push(prefix),
            }
        }
        let Some(b @ Value::Object(_)) = self.given.get("backing") else {
            return Ok(());
        };
        let mut all = Vec::new();
        keys("backing".into(), b, &mut all);
        match all.into_iter().min_by_key(|k| qdict_bucket(k)) {
            Some(k) => Err(Error::msg(format!(
                "Could not open '{name}': Block format '{}' does not support the option '{k}'",
                self.format()
            ))),
            None => Ok(()),
        }
    }

    /// The options the user gave for the top node.
    pub fn given(&self) -> &Value {
        &self.given
    }

    /// The root the image is accessed through.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.be
    }

    /// The graph.
    pub fn graph(&self) -> MutexGuard<'_, BlockGraph> {
        self.graph.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The top node's driver name (the format qemu-img shows).
    pub fn format(&self) -> &'static str {
        self.node.driver_name()
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.be.length()
    }

    /// Reads guest data; a failure reads like qemu-img convert's.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), Error> {
        self.be
            .read(off, &mut [IoSliceMut::new(buf)])
            .map_err(|source| Error::Read {
                offset: off,
                source,
            })
    }

    /// Block status through the whole chain, and the node that answers.
    pub fn status(&self, off: u64, len: u64) -> Result<RangeStatus, Error> {
        self.be.block_status(off, len).map_err(block_err)
    }

    /// Resizes the image (the root must have been opened with
    /// [`GraphImage::open_resizable`]).
    pub fn truncate(&self, len: u64) -> Result<(), Error> {
        let edge = self
            .be
            .root_edge()
            .ok_or_else(|| Error::msg("No medium inserted"))?;
        edge.truncate(len).map_err(block_err)
    }

    /// Block status in the qcow2 crate's terms.
    pub fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, Error> {
        Ok(to_status(&self.status(off, len)?))
    }

    /// The file the data of the node named `name` lives in, as `qemu-img map` names it
    /// (the node block status returns in QEMU): the node itself for a protocol, else its
    /// data file or primary child (`blkdebug::/x` for a qcow2 image over blkdebug).
    pub fn file_of(&self, name: &str) -> String {
        let Some(n) = self.graph().find_node(name) else {
            return String::new();
        };
        if n.driver().is_protocol() {
            return display_filename(&n, None);
        }
        let data = n.children().into_iter().find(|c| c.name() == "data-file");
        match data.or_else(|| n.primary_child()) {
            Some(c) => display_filename(&c.node(), None),
            None => display_filename(&n, None),
        }
    }
}

/// The file name of the protocol node below `n` along primary children.
fn file_below(n: &Arc<Node>) -> String {
    let mut n = n.clone();
    while !n.driver().is_protocol() {
        match n.primary_child() {
            Some(c) => n = c.node(),
            None => break,
        }
    }
    display_filename(&n, None)
}

impl Drop for GraphImage {
    fn drop(&mut self) {
        let mut g = self.graph();
        if let Err(e) = g.flush_all() {
            log::warn!("flush on close: {e}");
        }
        g.release_root(&self.be);
        g.close_all();
    }
}

/// Block status in the qcow2 crate's terms.
pub fn to_status(s: &RangeStatus) -> BlockStatus {
    BlockStatus {
        len: s.len,
        allocated: s.allocated,
        zero: s.zero,
        data: s.data,
        depth: s.depth,
        offset: s.offset,
    }
}

/// A graph image as the qcow2 crate's reader (for the code that takes any `BlockRead`).
pub struct GraphReader(pub Arc<GraphImage>);

impl BlockRead for GraphReader {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2::Result<()> {
        self.0
            .be
            .read(offset, &mut [IoSliceMut::new(buf)])
            .map_err(|e| match e {
                BlockError::Io { errno, .. } => {
                    qcow2::Error::Io(std::io::Error::from_raw_os_error(errno))
                }
                other => qcow2::Error::InvalidArgument(other.to_string()),
            })
    }

    fn block_status(&self, offset: u64, len: u64) -> qcow2::Result<BlockStatus> {
        self.0
            .status(offset, len)
            .map(|s| to_status(&s))
            .map_err(|e| qcow2::Error::InvalidArgument(e.to_string()))
    }

    fn format_name(&self) -> &str {
        self.0.format()
    }

    fn filename(&self) -> Option<&std::path::Path> {
        Some(&self.0.file)
    }
}

/// What a source opened through the graph amounts to.
pub enum Plain {
    /// A qcow2 or raw image in a plain file: the direct path can open it.
    File {
        /// The file.
        path: String,
        /// `qcow2` or `raw`.
        fmt: &'static str,
    },
    /// Anything else: the top node's driver.
    Other(&'static str),
}

/// The name and format the subcommands that work on the qcow2 crate's image directly take
/// for `src`: a plain qcow2 or raw file behind a `json:` name or `--image-opts` string
/// becomes that file; anything else keeps a `json:` name (the graph opens it, and the
/// subcommand gives qemu-img's error for drivers it cannot handle).
pub fn resolve(src: &Source<'_>) -> Result<(String, Option<String>), Error> {
    if !src.uses_graph() {
        return Ok((src.name.to_string(), src.fmt.map(str::to_string)));
    }
    Ok(match reduce(src)? {
        Plain::File { path, fmt } => (path, Some(fmt.to_string())),
        Plain::Other(_) if src.image_opts => {
            let tree = block_graph::cli::keyval_parse(src.name, None).map_err(block_err)?;
            (format!("json:{tree}"), None)
        }
        Plain::Other(_) => (src.name.to_string(), src.fmt.map(str::to_string)),
    })
}

/// Opens `src` through the graph to see whether it names a plain qcow2 or raw file (for
/// the subcommands that work on the qcow2 crate's image directly).
pub fn reduce(src: &Source<'_>) -> Result<Plain, Error> {
    let g = GraphImage::open(src, false, Cache::Writeback, true)?;
    let n = g.node();
    let fmt = n.driver_name();
    let over_file = n
        .primary_child()
        .is_some_and(|c| FILE_PROTOCOLS.contains(&c.node().driver_name()));
    let name = display_filename(n, None);
    Ok(match fmt {
        "qcow2" | "raw" if over_file && !name.starts_with("json:") => {
            Plain::File { path: name, fmt }
        }
        _ => Plain::Other(fmt),
    })
}

/// A qcow2 image whose file is not a plain file (a filter between them, as in
/// `{"driver": "qcow2", "file": {"driver": "blkdebug", ...}}`), opened with the qcow2 crate
/// over its file node in the graph, for the subcommands that need the format itself
/// (check). Returns the image and the graph holding its file, which must outlive it.
pub fn qcow2_over_graph(
    src: &Source<'_>,
    writable: bool,
) -> Result<(qcow2::Qcow2, GraphImage), Error> {
    let wrap = |e: Error| Error::msg(format!("Could not open '{}': {e}", src.name));
    let tree = legacy_tree(src).map_err(wrap)?;
    let file = match tree.get("file") {
        Some(f @ Value::Object(_)) => format!("json:{f}"),
        _ => {
            return Err(wrap(Error::msg(
                "A block device must be specified for \"file\"",
            )))
        }
    };
    let fsrc = Source {
        name: &file,
        fmt: None,
        image_opts: false,
        force_share: src.force_share,
    };
    // A qcow2 node writing its file may grow it (QEMU's qcow2 takes RESIZE on its file).
    let perm = if writable {
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    } else {
        Perm::CONSISTENT_READ
    };
    let fg = GraphImage::open_perm(&fsrc, perm, Cache::Writeback, true)?;
    let edge = fg
        .backend()
        .root_edge()
        .ok_or_else(|| wrap(Error::msg("the image's file node is gone")))?;
    let storage: Arc<dyn qcow2::Storage> = Arc::new(block_graph::drivers::qcow2::EdgeStorage(edge));
    let img = qcow2::Qcow2::open(
        storage,
        qcow2::OpenOptions {
            writable,
            allow_corrupt: writable,
            repair_dirty: false,
            no_backing: true,
            ..Default::default()
        },
    )
    .map_err(|e| wrap(Error::msg(e.to_string())))?;
    Ok((img, fg))
}

/// The qcow2 crate's opener for backing files, extended to backing files named `json:{...}`
/// (or with a format other than qcow2 and raw), which open through the graph as QEMU opens
/// them; plain files open as [`qcow2::FollowFiles`] opens them, at any depth.
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphOpener {
    /// How plain files are opened.
    pub files: qcow2::FollowFiles,
}

/// Why a backing file did not open, as QEMU's `bdrv_open_backing_file` reports it:
/// `Could not open backing file: ` before the backing image's own error (a file that cannot
/// be opened: `Could not open 'PATH': <strerror>`, with PATH resolved against the image).
fn backing_error(e: qcow2::Error, path: &std::path::Path) -> qcow2::Error {
    let why = match e {
        // Worded already (a deeper layer, or an image opened through the graph).
        qcow2::Error::InvalidArgument(m) => m,
        qcow2::Error::Io(io) => format!(
            "Could not open '{}': {}",
            path.display(),
            crate::img::strerror(&io)
        ),
        qcow2::Error::Open { reason, .. } => format!(
            "Could not open '{}': {}",
            path.display(),
            crate::img::without_os_error(reason)
        ),
        other => other.to_string(),
    };
    qcow2::Error::InvalidArgument(format!("Could not open backing file: {why}"))
}

impl qcow2::ImageOpener for GraphOpener {
    fn open_backing(
        &self,
        req: &qcow2::backing::BackingRequest<'_>,
    ) -> qcow2::Result<Arc<dyn BlockRead>> {
        let src = Source::path(req.name, req.format);
        if src.uses_graph() {
            let cache = if self.files.direct {
                Cache::None
            } else {
                Cache::Writeback
            };
            let g = GraphImage::open(&src, false, cache, false).map_err(|e| {
                qcow2::Error::InvalidArgument(format!("Could not open backing file: {e}"))
            })?;
            return Ok(Arc::new(GraphReader(Arc::new(g))));
        }
        let path = qcow2::backing::resolve_relative(req.name, req.image_path);
        self.open_backing_file(req, &path)
            .map_err(|e| backing_error(e, &path))
    }

    fn open_data_file(
        &self,
        req: &qcow2::backing::DataFileRequest<'_>,
    ) -> qcow2::Result<Arc<dyn qcow2::Storage>> {
        // QEMU: `Could not open 'NAME': <strerror>` (the name as in the header).
        self.files.open_data_file(req).map_err(|e| match e {
            qcow2::Error::Open { name, reason } => qcow2::Error::Open {
                reason: crate::img::without_os_error(reason),
                name,
            },
            other => other,
        })
    }
}

impl GraphOpener {
    /// Opens the backing file at `path` (a plain file).
    fn open_backing_file(
        &self,
        req: &qcow2::backing::BackingRequest<'_>,
        path: &std::path::Path,
    ) -> qcow2::Result<Arc<dyn BlockRead>> {
        let fail = |reason: String| qcow2::Error::Open {
            name: req.name.to_string(),
            reason,
        };
        let fmt = match req.format {
            Some(f) => f,
            None => qcow2::backing::probe_format(path)?,
        };
        if fmt != "qcow2" || req.depth + 1 > self.files.max_depth {
            return qcow2::ImageOpener::open_backing(&self.files, req);
        }
        // A qcow2 layer: opened with this opener, so json: names deeper down open too.
        let canon = path.canonicalize()?;
        if req.chain.contains(&canon) {
            return Err(fail("backing chain contains a loop".into()));
        }
        let mut chain = req.chain.to_vec();
        chain.push(canon);
        let opts = qcow2::OpenOptions {
            opener: Arc::new(*self),
            direct: self.files.direct,
            ..Default::default()
        };
        let img = qcow2::Qcow2::open_path_in_chain(path, opts, req.depth + 1, &chain)?;
        Ok(Arc::new(img))
    }
}
