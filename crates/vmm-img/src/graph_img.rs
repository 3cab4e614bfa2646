//! Images opened through the block graph (`block-graph`): QEMU's `json:{...}` file names,
//! `--image-opts` option strings and drivers other than qcow2 and raw (`-f null-co`, ...).
//!
//! qemu-img opens these through `bdrv_open`'s legacy option rules, which are looser than
//! `blockdev-add`'s: no `node-name`, a missing `driver` is probed (formats) or taken from the
//! file name (protocols), `"backing": ""` means no backing file, values may be strings where
//! numbers are expected. [`legacy_tree`] turns such options into a tree `blockdev-add`
//! accepts; the graph does the rest.

use std::io::IoSliceMut;
use std::sync::{Arc, Mutex, MutexGuard};

use block_graph::options::Inherit;
use block_graph::{BlockBackend, BlockError, BlockGraph, Node, Perm, RangeStatus};
use qcow2::{BlockRead, BlockStatus};
use serde_json::{Map, Value};

use crate::img::Cache;
use crate::Error;

/// How the user named an image on the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Source<'a> {
    /// The file name, `json:{...}` or (with `image_opts`) the option string.
    pub name: &'a str,
    /// `-f`.
    pub fmt: Option<&'a str>,
    /// `--image-opts`: `name` is a key=value option string.
    pub image_opts: bool,
    /// `-U`: share every permission with other users of the image.
    pub force_share: bool,
}

impl<'a> Source<'a> {
    /// A source as the command line names it.
    pub fn new(name: &'a str, fmt: Option<&'a str>, image_opts: bool, force_share: bool) -> Self {
        Source {
            name,
            fmt,
            image_opts,
            force_share,
        }
    }

    /// A plain file name with an optional format.
    pub fn path(name: &'a str, fmt: Option<&'a str>) -> Self {
        Source {
            name,
            fmt,
            ..Default::default()
        }
    }

    /// Whether the image is opened through the graph (everything but plain qcow2 and raw
    /// files, which keep the direct path).
    pub fn uses_graph(&self) -> bool {
        self.image_opts
            || self.name.starts_with("json:")
            || self.fmt.is_some_and(|f| f != "qcow2" && f != "raw")
    }
}

/// Drivers whose children other than `backing` are opened as protocols (QEMU's format
/// drivers; filters probe the format of their children).
const FORMATS: &[&str] = &["qcow2", "raw"];

/// Protocol drivers that take their file name as `filename`.
const FILE_PROTOCOLS: &[&str] = &["file", "host_device"];

/// Nests dotted keys (`"file.filename"`) into objects and turns objects whose keys are all
/// indexes into lists, as QEMU does with the keys of a `json:` file name.
fn nest(v: Value) -> Result<Value, String> {
    let Value::Object(m) = v else {
        return Ok(match v {
            Value::Array(a) => Value::Array(a.into_iter().map(nest).collect::<Result<_, _>>()?),
            other => other,
        });
    };
    let mut out = Map::new();
    for (k, val) in m {
        let val = nest(val)?;
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut cur = &mut out;
        for p in parts {
            let slot = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            cur = slot
                .as_object_mut()
                .ok_or_else(|| format!("Parameters '{p}.*' used inconsistently"))?;
        }
        match (cur.get_mut(last), val) {
            (Some(Value::Object(old)), Value::Object(new)) => old.extend(new),
            (Some(_), _) => return Err(format!("Duplicate option '{k}'")),
            (None, val) => {
                cur.insert(last.to_string(), val);
            }
        }
    }
    Ok(listify(Value::Object(out)))
}

/// Objects with only index keys (`"0"`, `"1"`, ...) become lists.
fn listify(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let indexed = !m.is_empty()
                && m.keys().all(|k| k.bytes().all(|c| c.is_ascii_digit()))
                && (0..m.len()).all(|i| m.contains_key(&i.to_string()));
            if indexed {
                let mut m = m;
                Value::Array(
                    (0..m.len())
                        .map(|i| listify(m.remove(&i.to_string()).unwrap_or(Value::Null)))
                        .collect(),
                )
            } else {
                Value::Object(m.into_iter().map(|(k, v)| (k, listify(v))).collect())
            }
        }
        Value::Array(a) => Value::Array(a.into_iter().map(listify).collect()),
        other => other,
    }
}

/// The role a node is opened in, which decides what a missing `driver` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A format node (top, backing, a filter's child): the format is probed.
    Format,
    /// A format's `file`/`data-file`: the protocol comes from the file name.
    Protocol,
}

/// The protocol a file name names (QEMU's `bdrv_find_protocol` for what the graph has).
fn protocol_of(m: &mut Map<String, Value>) -> Result<String, Error> {
    let Some(f) = m
        .get("filename")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err(Error::msg("The 'file' block driver requires a file name"));
    };
    for p in ["null-co", "null-aio"] {
        if f == format!("{p}://") {
            m.remove("filename");
            return Ok(p.into());
        }
    }
    use std::os::unix::fs::FileTypeExt;
    let dev = std::fs::metadata(&f).is_ok_and(|md| md.file_type().is_block_device());
    Ok(if dev { "host_device" } else { "file" }.into())
}

/// Probes the format of the image a (normalised) `file` child holds: qcow2 when it starts
/// with qcow2's magic, else raw (what the direct path probes too).
fn probe(file: &Value) -> Result<String, Error> {
    let mut file = file.clone();
    if let Value::Object(m) = &mut file {
        m.insert("read-only".into(), Value::Bool(true));
        m.insert("force-share".into(), Value::Bool(true));
    }
    let opts = block_graph::cli::blockdev_options_from_tree(file).map_err(block_err)?;
    let mut g = BlockGraph::new();
    let node = g
        .open_node(&opts, &Inherit::top(), false)
        .map_err(block_err)?;
    let be = g
        .new_root(&node, Perm::CONSISTENT_READ, Perm::ALL, "format probing")
        .map_err(block_err)?;
    let mut magic = [0u8; 4];
    let fmt = if be.length() >= 4 && be.read_buf(0, &mut magic).is_ok() && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    };
    g.release_root(&be);
    g.close_all();
    Ok(fmt.into())
}

/// Rewrites one node's legacy options in place into what `blockdev-add` takes.
fn normalise(v: &mut Value, role: Role) -> Result<(), Error> {
    // A string is a reference to a node: the graph reports what it cannot find.
    let Value::Object(m) = v else { return Ok(()) };
    if role == Role::Protocol && m.is_empty() {
        return Err(Error::msg("A block device must be specified for \"file\""));
    }
    if m.get("backing").and_then(Value::as_str) == Some("") {
        eprintln!(
            "vmm-img: warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead"
        );
        m.insert("backing".into(), Value::Null);
    }
    let format_driver = |m: &Map<String, Value>| {
        m.get("driver")
            .and_then(Value::as_str)
            .is_some_and(|d| FORMATS.contains(&d))
    };
    // The children first: probing the format needs a complete `file`.
    let child_role = if format_driver(m) || !m.contains_key("driver") {
        Role::Protocol
    } else {
        Role::Format
    };
    for (k, c) in m.iter_mut() {
        match k.as_str() {
            "file" | "data-file" => normalise(c, child_role)?,
            "backing" | "image" | "raw" | "test" | "target" => normalise(c, Role::Format)?,
            "children" => {
                if let Value::Array(a) = c {
                    for c in a {
                        normalise(c, Role::Format)?;
                    }
                }
            }
            _ => {}
        }
    }
    if !m.contains_key("driver") {
        let d = match role {
            Role::Protocol => protocol_of(m)?,
            Role::Format => match m.get("file") {
                Some(f @ Value::Object(_)) => probe(f)?,
                _ => return Err(Error::msg("Must specify either driver or file")),
            },
        };
        m.insert("driver".into(), Value::String(d));
    }
    if format_driver(m) && !m.contains_key("file") {
        return Err(Error::msg("A block device must be specified for \"file\""));
    }
    Ok(())
}

/// The options tree of a source named with `json:`, `--image-opts` or `-f DRIVER FILE`, in
/// `blockdev-add`'s terms (string leaves are converted by the schema afterwards).
pub fn legacy_tree(src: &Source<'_>) -> Result<Value, Error> {
    let mut tree = if src.image_opts {
        if src.fmt.is_some() {
            return Err(Error::msg(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        block_graph::cli::keyval_parse(src.name, None).map_err(block_err)?
    } else if let Some(j) = src.name.strip_prefix("json:") {
        let v: Value = serde_json::from_str(j).map_err(|e| {
            let why = if e.is_eof() {
                "premature EOI".to_string()
            } else {
                e.to_string()
            };
            Error::msg(format!(
                "Could not parse the JSON options: JSON parse error, {why}"
            ))
        })?;
        if !v.is_object() {
            return Err(Error::msg("Invalid JSON object given"));
        }
        nest(v).map_err(Error::msg)?
    } else {
        plain_tree(src.name, src.fmt.unwrap_or("raw"))?
    };
    if let (Some(f), Value::Object(m)) = (src.fmt, &mut tree) {
        m.insert("driver".into(), Value::String(f.to_string()));
    }
    normalise(&mut tree, Role::Format)?;
    Ok(tree)
}

/// `-f DRIVER FILE` for a driver other than qcow2 and raw.
fn plain_tree(name: &str, fmt: &str) -> Result<Value, Error> {
    let mut m = Map::new();
    m.insert("driver".into(), Value::String(fmt.into()));
    if FILE_PROTOCOLS.contains(&fmt) {
        m.insert("filename".into(), Value::String(name.into()));
    } else if fmt == "null-co" || fmt == "null-aio" {
        if name != format!("{fmt}://") {
            return Err(Error::msg(format!(
                "The only allowed filename for this driver is '{fmt}://'"
            )));
        }
    } else {
        let mut f = Map::new();
        f.insert("filename".into(), Value::String(name.into()));
        m.insert("file".into(), Value::Object(f));
    }
    Ok(Value::Object(m))
}

/// A block layer error as qemu-img words it (the schema refuses an unknown driver where
/// QEMU's legacy open reports it).
fn block_err(e: BlockError) -> Error {
    let m = e.to_string();
    if let Some(rest) = m.strip_prefix("Parameter '") {
        if let Some((key, val)) = rest.split_once("' does not accept value '") {
            if key == "driver" || key.ends_with(".driver") {
                return Error::msg(format!("Unknown driver '{}", val));
            }
        }
    }
    Error::msg(m)
}

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
        let wrap = |e: Error| Error::msg(format!("Could not open '{}': {e}", src.name));
        if src.image_opts && src.fmt.is_some() {
            return Err(Error::msg(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        let mut tree = legacy_tree(src).map_err(wrap)?;
        let given = tree.clone();
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
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm |= Perm::WRITE;
        }
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
        Ok(GraphImage {
            graph: Mutex::new(graph),
            be,
            node,
            given,
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

    /// Block status in the qcow2 crate's terms.
    pub fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, Error> {
        Ok(to_status(&self.status(off, len)?))
    }

    /// The file name of the protocol node below the node named `name` (the file data
    /// mapped by block status lives in, as `qemu-img map` names it).
    pub fn file_of(&self, name: &str) -> String {
        let mut cur = self.graph().find_node(name);
        while let Some(n) = cur {
            if n.driver().is_protocol() || n.primary_child().is_none() {
                return display_filename(&n, None);
            }
            cur = n.primary_child().map(|e| e.node());
        }
        String::new()
    }
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
}

/// QEMU's QDict bucket of a key (`tdb_hash % QDICT_BUCKET_MAX`): QDicts iterate bucket by
/// bucket, which is the key order of every JSON object QEMU prints.
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, c) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// JSON as QEMU prints a QDict (keys in bucket order, `", "` and `": "` separators).
pub fn qdict_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            // Keys of one bucket come newest first; flattened keys (`list.0.key`) were
            // inserted in their inner object's order.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| {
                let inner = k.rsplit('.').next().unwrap_or(k);
                (qdict_bucket(k), std::cmp::Reverse(qdict_bucket(inner)))
            });
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", Value::String((*k).clone()), qdict_json(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(qdict_json).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}

/// Flattens the lists of a node's options into dotted keys (`inject-error.0.event`), as
/// QEMU's `json:` file names carry a node's own options; children (`file`, ..., and the
/// `children` list of quorum) stay nested.
fn flatten_lists(v: Value) -> Value {
    fn put(out: &mut Map<String, Value>, prefix: &str, v: Value) {
        match v {
            Value::Array(a) if prefix == "children" => {
                out.insert(
                    prefix.to_string(),
                    Value::Array(a.into_iter().map(flatten_lists).collect()),
                );
            }
            Value::Array(a) => {
                for (i, x) in a.into_iter().enumerate() {
                    put(out, &format!("{prefix}.{i}"), x);
                }
            }
            Value::Object(m) if prefix.contains('.') => {
                for (k, x) in m {
                    put(out, &format!("{prefix}.{k}"), x);
                }
            }
            other => {
                out.insert(prefix.to_string(), flatten_lists(other));
            }
        }
    }
    let Value::Object(mut m) = v else { return v };
    // Quorum's children are edges named `children.N`: QEMU lists them under `children`.
    let mut children: Vec<(usize, Value)> = Vec::new();
    let names: Vec<String> = m.keys().cloned().collect();
    for k in names {
        if let Some(i) = k.strip_prefix("children.").and_then(|i| i.parse().ok()) {
            if let Some(c) = m.remove(&k) {
                children.push((i, c));
            }
        }
    }
    if !children.is_empty() {
        children.sort_by_key(|(i, _)| *i);
        m.insert(
            "children".into(),
            Value::Array(children.into_iter().map(|(_, c)| c).collect()),
        );
    }
    let mut out = Map::new();
    for (k, x) in m {
        put(&mut out, &k, x);
    }
    Value::Object(out)
}

/// Removes `"backing": null` from the top level: QEMU does not count a backing file left
/// closed on purpose (`BDRV_O_NO_BACKING`) as overriding the image's.
fn drop_null_backing(v: &mut Value) {
    if let Value::Object(m) = v {
        if m.get("backing") == Some(&Value::Null) {
            m.remove("backing");
        }
    }
}

/// The path a format-over-file tree amounts to, if it is nothing more.
fn plain_path(v: &Value) -> Option<String> {
    let m = v.as_object()?;
    let f = m.get("file")?.as_object()?;
    let proto = f.get("driver")?.as_str()?;
    (m.len() == 2 && f.len() == 2 && FILE_PROTOCOLS.contains(&proto))
        .then(|| f.get("filename")?.as_str().map(str::to_string))
        .flatten()
}

/// Puts back the values the user gave as strings (QEMU's `json:` names show the options
/// as given: `"size": "4096"` from `--image-opts`).
fn keep_given(o: &mut Value, given: &Value) {
    match (o, given) {
        (Value::Object(o), Value::Object(g)) => {
            for (k, v) in o.iter_mut() {
                match (g.get(k), &*v) {
                    (Some(gv @ Value::String(_)), Value::Number(_) | Value::Bool(_)) => {
                        *v = gv.clone()
                    }
                    (Some(gv), _) => keep_given(v, gv),
                    (None, _) => {}
                }
            }
        }
        (Value::Array(o), Value::Array(g)) => {
            for (v, gv) in o.iter_mut().zip(g) {
                keep_given(v, gv);
            }
        }
        _ => {}
    }
}

/// The node's file name as qemu-img prints it: a path, or `json:{...}` in QEMU's key order;
/// `given` are the user's options for the node, if any.
pub fn display_filename(n: &Node, given: Option<&Value>) -> String {
    let f = block_graph::filename::node_filename(n);
    if !f.starts_with("json:") {
        return f;
    }
    let mut o = block_graph::filename::full_options(n);
    if let Some(g) = given {
        keep_given(&mut o, g);
    }
    if n.backing().is_none() {
        drop_null_backing(&mut o);
    }
    match plain_path(&o) {
        Some(p) => p,
        None => format!("json:{}", qdict_json(&flatten_lists(o))),
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

/// Whether `qemu-img info` shows a dirty flag for the node (QEMU: when the driver answers
/// `bdrv_get_info`).
pub fn has_dirty_flag(n: &Node) -> bool {
    block_graph::qmp::query::image_info(n).dirty_flag.is_some()
}

/// `qemu-img info`'s data of one node, in the qcow2 crate's shape the printers take;
/// `given` are the user's options for the node, if any.
pub fn node_info(n: &Node, given: Option<&Value>) -> qcow2::ImageInfo {
    use qapi_types::QapiType;
    let v = block_graph::qmp::query::image_info(n).to_qmp();
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let d = v
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .cloned()
        .unwrap_or(Value::Null);
    let b = |k: &str| d.get(k).and_then(Value::as_bool);
    let snapshots = v
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| qcow2::SnapshotInfo {
                    id: x.get("id").and_then(Value::as_str).unwrap_or("").into(),
                    name: x.get("name").and_then(Value::as_str).unwrap_or("").into(),
                    vm_state_size: u(x, "vm-state-size").unwrap_or(0),
                    date_sec: u(x, "date-sec").unwrap_or(0),
                    date_nsec: u(x, "date-nsec").unwrap_or(0),
                    vm_clock_sec: u(x, "vm-clock-sec").unwrap_or(0),
                    vm_clock_nsec: u(x, "vm-clock-nsec").unwrap_or(0),
                    icount: u(x, "icount"),
                })
                .collect()
        })
        .unwrap_or_default();
    let bitmaps = d.get("bitmaps").and_then(Value::as_array).map(|a| {
        a.iter()
            .map(|x| qcow2::BitmapInfo {
                name: x.get("name").and_then(Value::as_str).unwrap_or("").into(),
                granularity: u(x, "granularity").unwrap_or(0),
                flags: x
                    .get("flags")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    });
    qcow2::ImageInfo {
        filename: Some(display_filename(n, given)),
        format: n.driver_name().to_string(),
        dirty_flag: v
            .get("dirty-flag")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        actual_size: u(&v, "actual-size"),
        virtual_size: u(&v, "virtual-size").unwrap_or(0),
        cluster_size: u(&v, "cluster-size").unwrap_or(0),
        encrypted: false,
        backing_filename: s("backing-filename"),
        full_backing_filename: s("full-backing-filename"),
        backing_filename_format: s("backing-filename-format"),
        snapshots,
        format_specific: qcow2::ImageInfoSpecificQCow2 {
            compat: d.get("compat").and_then(Value::as_str).unwrap_or("").into(),
            data_file: d
                .get("data-file")
                .and_then(Value::as_str)
                .map(str::to_string),
            data_file_raw: b("data-file-raw"),
            extended_l2: b("extended-l2"),
            lazy_refcounts: b("lazy-refcounts"),
            corrupt: b("corrupt"),
            refcount_bits: u(&d, "refcount-bits").unwrap_or(0),
            bitmaps,
            compression_type: d
                .get("compression-type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_in_qdict_order() {
        // What qemu-img 7.2 prints for this node.
        assert_eq!(
            qdict_json(&json!({"driver": "raw", "offset": 4096, "size": 65536,
                "file": {"filename": "/x", "driver": "file"}})),
            r#"{"offset": 4096, "driver": "raw", "size": 65536, "file": {"driver": "file", "filename": "/x"}}"#
        );
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            nest(
                json!({"driver": "raw", "file.filename": "/x", "file": {"driver": "file"},
                "l.1": "b", "l.0": "a"})
            )
            .unwrap(),
            json!({"driver": "raw", "file": {"driver": "file", "filename": "/x"},
                "l": ["a", "b"]})
        );
        assert!(nest(json!({"a": 1, "a.b": 2})).is_err());
    }

    #[test]
    fn legacy_options_become_blockdev_options() {
        let t = legacy_tree(&Source {
            name: "driver=raw,file.filename=null-co://,backing=",
            image_opts: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            t,
            json!({"driver": "raw", "backing": null, "file": {"driver": "null-co"}})
        );
        let e = |name: &str| {
            legacy_tree(&Source::path(name, None))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e(r#"json:{"driver":"qcow2","filename":"/x"}"#),
            "A block device must be specified for \"file\""
        );
        assert_eq!(
            e(r#"json:{"filename":"/x"}"#),
            "Must specify either driver or file"
        );
        assert!(e("json:{").starts_with("Could not parse the JSON options"));
        assert_eq!(
            legacy_tree(&Source::path("/x", Some("null-co")))
                .unwrap_err()
                .to_string(),
            "The only allowed filename for this driver is 'null-co://'"
        );
    }
}
