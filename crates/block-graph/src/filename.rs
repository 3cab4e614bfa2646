//! Node file names as QEMU's `bdrv_refresh_filename` makes them: a plain path when the node
//! can be opened from it alone, otherwise `json:{...}` with the options that matter (a
//! backing node other than the image's header names, a raw window, null driver options).

use serde_json::{Map, Value};

use crate::node::Node;

/// Formats JSON as QEMU prints it: keys sorted, `", "` and `": "` separators.
pub fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
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

/// Whether the node needs a `json:` file name.
fn needs_json(n: &Node) -> bool {
    if n.driver().filename().is_some() {
        return false;
    }
    if !n.driver().strong_options().is_empty() || backing_overridden(n) {
        return true;
    }
    let children = n.children();
    let data_children = children.iter().filter(|c| c.name() != "backing").count();
    if data_children > 1 {
        return true;
    }
    primary_filename(n).starts_with("json:")
}

/// The options that recreate the node (QEMU's `full_open_options`).
pub fn full_options(n: &Node) -> Value {
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
        assert_eq!(
            qemu_json(
                &json!({"size": 65536, "driver": "null-co", "b": {"z": null, "a": [1, "x"]}})
            ),
            r#"{"b": {"a": [1, "x"], "z": null}, "driver": "null-co", "size": 65536}"#
        );
    }
}
