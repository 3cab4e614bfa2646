//! Node file names as QEMU's `bdrv_refresh_filename` makes them: a plain path when the node
//! can be opened from it alone, otherwise `json:{...}` with the options that matter (a
//! backing node other than the image's header names, a raw window, null driver options).

use serde_json::{Map, Value};

use crate::node::Node;

/// The bucket of a key in QEMU's `QDict` (`tdb_hash(key) % QDICT_BUCKET_MAX`): a QDict
/// iterates its buckets in order, so this decides the order of the keys QEMU prints.
fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// Formats JSON as QEMU prints a `QDict` (`json:` file names): keys in the order of
/// QEMU's hash buckets (within a bucket, the last inserted first, as QEMU's list heads
/// do), `", "` and `": "` separators.
pub fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<(usize, &String)> = m.keys().enumerate().collect();
            keys.sort_by_key(|(i, k)| (qdict_bucket(k), std::cmp::Reverse(*i)));
            let keys: Vec<&String> = keys.into_iter().map(|(_, k)| k).collect();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", Value::String((*k).clone()), qemu_json(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}

/// Whether the node's backing differs from what its image header names (QEMU's
/// `bdrv_backing_overridden`).
pub fn backing_overridden(n: &Node) -> bool {
    if !n.driver().supports_backing() {
        return false;
    }
    let header = n.driver().backing_file();
    match (header, n.backing()) {
        (None, None) => false,
        (Some(_), None) | (None, Some(_)) => true,
        (Some((name, _)), Some(b)) => {
            let base = base_filename(n);
            let want = crate::drivers::full_backing_filename(&base, &name).unwrap_or(name);
            want != node_filename(&b.node())
        }
    }
}

/// The file name relative names in the node's image resolve against (QEMU's
/// `bdrv_dirname`): the protocol node's path below formats and filters.
pub fn base_filename(n: &Node) -> String {
    // Only a protocol's name is a place; a filter's own name (`blkdebug::/x`) is not.
    if let Some(f) = n.driver().filename().filter(|_| n.driver().is_protocol()) {
        return f;
    }
    match n.primary_child() {
        Some(c) => base_filename(&c.node()),
        None => String::new(),
    }
}

fn primary_filename(n: &Node) -> String {
    match n.primary_child() {
        Some(c) => node_filename(&c.node()),
        None => String::new(),
    }
}

/// Whether the node needs a `json:` file name: QEMU's `bdrv_refresh_filename` takes the
/// primary child's name only for a format node without strong options over a protocol
/// node (opening that file with this format recreates the node).
fn needs_json(n: &Node) -> bool {
    if n.driver().filename().is_some() {
        return false;
    }
    if !n.driver().strong_options().is_empty() || backing_overridden(n) || n.driver().is_filter() {
        return true;
    }
    let children = n.children();
    let data_children = children.iter().filter(|c| c.name() != "backing").count();
    if data_children > 1 {
        return true;
    }
    // QEMU asks for a child opened by file name (`bdrv_file_open`: protocols, and filters
    // such as blkdebug that make their own names) with a plain name.
    match n.primary_child().map(|c| c.node()) {
        Some(c) if c.driver().is_protocol() || c.driver().filename().is_some() => {
            primary_filename(n).starts_with("json:")
        }
        _ => true,
    }
}

/// The options that recreate the node (QEMU's `full_open_options`).
pub fn full_options(n: &Node) -> Value {
    if n.is_implicit() {
        if let Some(c) = n.primary_child() {
            return full_options(&c.node());
        }
    }
    let mut m = Map::new();
    m.insert("driver".into(), Value::String(n.driver_name().into()));
    if let Some(f) = n.driver().filename().filter(|_| n.driver().is_protocol()) {
        if !f.starts_with("json:") && !f.contains("://") {
            m.insert("filename".into(), Value::String(f));
        }
    }
    for (k, v) in n.driver().strong_options() {
        m.insert(k.into(), v);
    }
    let overridden = backing_overridden(n);
    // Quorum's children (edges `children.N`, with gaps after removals) are one list, in
    // index order (QEMU's quorum_gather_child_options).
    let mut listed: Vec<(u64, Value)> = Vec::new();
    for c in n.children() {
        if c.name() == "backing" && !overridden {
            continue;
        }
        if let Some(i) = c
            .name()
            .strip_prefix("children.")
            .and_then(|i| i.parse().ok())
        {
            listed.push((i, full_options(&c.node())));
            continue;
        }
        m.insert(c.name().into(), full_options(&c.node()));
    }
    if !listed.is_empty() {
        listed.sort_by_key(|(i, _)| *i);
        m.insert(
            "children".into(),
            Value::Array(listed.into_iter().map(|(_, v)| v).collect()),
        );
    }
    if overridden && n.backing().is_none() {
        m.insert("backing".into(), Value::Null);
    }
    Value::Object(m)
}

/// The node's file name as QEMU shows it in `query-block` and `query-named-block-nodes`.
pub fn node_filename(n: &Node) -> String {
    if let Some(f) = n.driver().filename() {
        return f;
    }
    if n.is_implicit() {
        // QEMU copies an implicit filter's names from its only child.
        return primary_filename(n);
    }
    if needs_json(n) {
        return format!("json:{}", qemu_json(&full_options(n)));
    }
    primary_filename(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_like_qemu() {
        // Key orders as qemu-storage-daemon 7.2 prints them in query-named-block-nodes.
        assert_eq!(
            qemu_json(&json!({"driver": "null-co", "size": 65536, "read-zeroes": true})),
            r#"{"read-zeroes": true, "driver": "null-co", "size": 65536}"#
        );
        assert_eq!(
            qemu_json(
                &json!({"driver": "raw", "file": {"driver": "file", "filename": "/x"},
                              "offset": 4096, "size": 65536})
            ),
            r#"{"offset": 4096, "driver": "raw", "size": 65536, "file": {"driver": "file", "filename": "/x"}}"#
        );
        assert_eq!(
            qemu_json(&json!({"driver": "throttle", "throttle-group": "tg", "file": [1, "x"]})),
            r#"{"throttle-group": "tg", "driver": "throttle", "file": [1, "x"]}"#
        );
        assert_eq!(qdict_bucket("driver"), 239);
        assert_eq!(qdict_bucket("file"), 463);
    }
}
