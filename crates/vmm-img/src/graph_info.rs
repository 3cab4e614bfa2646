//! How qemu-img shows images opened through the graph: `json:{...}` file names in QEMU's
//! key order with the values as given, and `info`'s data in the shape of the qcow2 crate's
//! `ImageInfo` the printers take.

use block_graph::Node;
use serde_json::{Map, Value};

use crate::graph_opts::FILE_PROTOCOLS;

/// QEMU's QDict bucket of a key (`tdb_hash % QDICT_BUCKET_MAX`): QDicts iterate bucket by
/// bucket, which is the key order of every JSON object QEMU prints.
pub fn qdict_bucket(key: &str) -> u32 {
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

/// The file name QEMU gives a node whose backing file was left closed (qemu-img opens
/// such images without I/O, `BDRV_O_NO_IO`, and then does not count the closed backing file
/// as overriding the header's): a node that needed `json:` only for that is named after its
/// primary child (`blkdebug::/x` for a qcow2 image over blkdebug).
fn no_io_filename(n: &Node) -> Option<String> {
    let d = n.driver();
    if n.backing().is_some()
        || !block_graph::filename::backing_overridden(n)
        || d.filename().is_some()
        || !d.strong_options().is_empty()
        || n.children()
            .iter()
            .filter(|c| c.name() != "backing")
            .count()
            > 1
    {
        return None;
    }
    // bdrv_refresh_filename takes the name of a primary child QEMU opened as a protocol
    // only (a raw node in between keeps the json: name).
    let child = n.primary_child()?.node();
    if d.is_filter() || !PROTOCOL_OPENED.contains(&child.driver_name()) {
        return None;
    }
    let f = block_graph::filename::node_filename(&child);
    (!f.starts_with("json:")).then_some(f)
}

/// Whether QEMU's `bdrv_refresh_filename` may name the node after its primary child: only
/// a node that is no filter, over a child QEMU opened as a protocol (raw over a qcow2 node,
/// or qcow2 over raw, gets a `json:` name). Nodes that name themselves, and nodes without
/// a primary child, keep the graph's answer.
fn takes_child_name(n: &Node) -> bool {
    let d = n.driver();
    match n.primary_child() {
        Some(c) if d.filename().is_none() => {
            !d.is_filter() && PROTOCOL_OPENED.contains(&c.node().driver_name())
        }
        _ => true,
    }
}

/// The drivers of the graph QEMU opens as protocols (`bdrv_file_open`).
const PROTOCOL_OPENED: &[&str] = &[
    "file",
    "host_device",
    "null-co",
    "null-aio",
    "blkdebug",
    "blkverify",
];

/// The node's file name as qemu-img prints it: a path, or `json:{...}` in QEMU's key order;
/// `given` are the user's options for the node, if any.
pub fn display_filename(n: &Node, given: Option<&Value>) -> String {
    if let Some(f) = no_io_filename(n) {
        return f;
    }
    let f = block_graph::filename::node_filename(n);
    if !f.starts_with("json:") && takes_child_name(n) {
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

/// The host bytes a node takes, as QEMU's `bdrv_get_allocated_file_size` counts them
/// ("disk size"): the driver's own answer for the protocols that have one; nothing for the
/// other drivers QEMU opens as protocols (blkdebug, blkverify: `-ENOTSUP`); a filter's
/// filtered child; else the sum over the children other than the backing file, nothing
/// if one of them cannot tell.
fn allocated_file_size(n: &Node) -> Option<u64> {
    let d = n.driver();
    match n.driver_name() {
        "file" | "host_device" | "null-co" | "null-aio" => d.allocated_size(),
        name if PROTOCOL_OPENED.contains(&name) => None,
        _ if d.is_filter() => allocated_file_size(&n.primary_child()?.node()),
        _ => n
            .children()
            .iter()
            .filter(|c| c.name() != "backing")
            .map(|c| allocated_file_size(&c.node()))
            .sum(),
    }
}

/// Whether `qemu-img info` shows a dirty flag for the node (QEMU: when the driver answers
/// `bdrv_get_info`).
pub fn has_dirty_flag(n: &Node) -> bool {
    block_graph::qmp::query::image_info(n).dirty_flag.is_some()
}

/// The persistent bitmaps of a qcow2 node as qcow2's format-specific info lists them
/// (flags `in-use` for bitmaps left inconsistent, `auto` for enabled ones), when the
/// driver's own info has none; `None` when there are none, as QEMU leaves the list out.
fn qcow2_bitmaps(n: &Node) -> Option<Vec<qcow2::BitmapInfo>> {
    if n.driver_name() != "qcow2" {
        return None;
    }
    // The node lists its bitmaps newest first; the image directory oldest first.
    let list: Vec<qcow2::BitmapInfo> = n
        .bitmaps()
        .iter()
        .rev()
        .filter(|b| b.is_persistent())
        .map(|b| {
            let mut flags = Vec::new();
            if b.is_inconsistent() {
                flags.push("in-use".to_string());
            }
            if b.is_enabled() {
                flags.push("auto".to_string());
            }
            qcow2::BitmapInfo {
                name: b.name().to_string(),
                granularity: b.granularity(),
                flags,
            }
        })
        .collect();
    (!list.is_empty()).then_some(list)
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
    let bitmaps = d
        .get("bitmaps")
        .and_then(Value::as_array)
        .map(|a| {
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
        })
        .or_else(|| qcow2_bitmaps(n));
    qcow2::ImageInfo {
        filename: Some(display_filename(n, given)),
        format: n.driver_name().to_string(),
        dirty_flag: v
            .get("dirty-flag")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        actual_size: allocated_file_size(n),
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
}
