//! QEMU's legacy image options (`bdrv_open`'s rules, which `json:{...}` file names and
//! qemu-img's `--image-opts` follow) turned into `blockdev-add`'s: no `node-name`, a
//! missing `driver` is probed (formats) or taken from the file name (protocols),
//! `"backing": ""` means no backing file, values may be strings where numbers are expected.
//! [`legacy_tree`] makes the tree; the schema converts its strings afterwards.

use block_graph::options::Inherit;
use block_graph::{BlockError, BlockGraph, Perm};
use serde_json::{Map, Value};

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
pub const FILE_PROTOCOLS: &[&str] = &["file", "host_device"];

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
pub fn block_err(e: BlockError) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
