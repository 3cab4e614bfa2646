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

/// The protocol a file name in the options names (QEMU's `bdrv_find_protocol` without
/// protocol prefixes, which only a file name given outside the options may carry: a
/// `file.filename` of `null-co://` is a file of that name): a host device or a file.
fn protocol_of(m: &Map<String, Value>) -> Result<String, Error> {
    let Some(f) = m.get("filename").and_then(Value::as_str) else {
        return Err(Error::msg("The 'file' block driver requires a file name"));
    };
    use std::os::unix::fs::FileTypeExt;
    let dev = std::fs::metadata(f).is_ok_and(|md| md.file_type().is_block_device());
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
    parse_sizes(&mut file)?;
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

/// Drivers QEMU opens as protocols (`bdrv_file_open`) whose filtered child (`image`,
/// `raw`) inherits that: a child without `driver` is a protocol named by its file name
/// (QEMU's `bdrv_inherited_options` leaves `BDRV_O_PROTOCOL` set for filtered children).
const PROTOCOL_FILTERS: &[(&str, &str)] = &[("blkdebug", "image"), ("blkverify", "raw")];

/// Rewrites one node's legacy options in place into what `blockdev-add` takes; `child` is
/// the name of the edge it is opened on (for the error about an empty one).
fn normalise(v: &mut Value, role: Role, child: &str) -> Result<(), Error> {
    // A string is a reference to a node: the graph reports what it cannot find.
    let Value::Object(m) = v else { return Ok(()) };
    if role == Role::Protocol && m.is_empty() {
        return Err(Error::msg(format!(
            "A block device must be specified for \"{child}\""
        )));
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
    let driver = m
        .get("driver")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    for (k, c) in m.iter_mut() {
        match k.as_str() {
            "file" | "data-file" => normalise(c, child_role, k)?,
            "image" | "raw" if PROTOCOL_FILTERS.contains(&(driver.as_str(), k.as_str())) => {
                normalise(c, Role::Protocol, k)?
            }
            "backing" | "image" | "raw" | "test" | "target" => normalise(c, Role::Format, k)?,
            "children" => {
                if let Value::Array(a) = c {
                    for c in a {
                        normalise(c, Role::Format, k)?;
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
    if m.get("driver").and_then(Value::as_str) == Some("quorum") {
        // quorum_open: the children are counted first, a missing vote-threshold reads 0.
        if m.get("children")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            return Err(Error::msg("Number of provided children must be 1 or more"));
        }
        m.entry("vote-threshold").or_insert(Value::from(0));
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
    normalise(&mut tree, Role::Format, "")?;
    Ok(tree)
}

/// The options QEMU's drivers declare as sizes (`QEMU_OPT_SIZE`) in their legacy option
/// lists: a string value takes a suffix (`64k`) there.
const SIZE_OPTS: &[(&str, &[&str])] = &[
    ("raw", &["offset", "size"]),
    ("null-co", &["size"]),
    ("null-aio", &["size"]),
    (
        "qcow2",
        &[
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
        ],
    ),
    (
        "blkdebug",
        &[
            "align",
            "max-transfer",
            "opt-write-zero",
            "max-write-zero",
            "opt-discard",
            "max-discard",
        ],
    ),
];

/// A size as QEMU's `qemu_strtosz` reads it: decimal (or `0x` hex) bytes, an optional
/// fraction and one suffix of `B`, `k`, `M`, `G`, `T`, `P`, `E` (any case). `Err(true)`
/// when it does not fit 64 bits, `Err(false)` when it is not a size; the flag of `Ok`
/// says whether a hex number had a suffix (deprecated).
pub fn strtosz(s: &str) -> Result<(u64, bool), bool> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    let digits = |t: &str, radix: u32| t.find(|c: char| !c.is_digit(radix)).unwrap_or(t.len());
    let n = digits(t, 10);
    if n == 0 {
        return Err(false);
    }
    let mut val: u128 = t[..n].parse::<u64>().map_err(|_| true)?.into();
    let mut rest = &t[n..];
    let mut fraction = 0f64;
    let mut hex = false;
    if val == 0 && (rest.starts_with('x') || rest.starts_with('X')) {
        let h = &rest[1..];
        let n = digits(h, 16);
        if n == 0 {
            return Err(false);
        }
        val = u64::from_str_radix(&h[..n], 16).map_err(|_| true)?.into();
        rest = &h[n..];
        if rest.starts_with('.') {
            return Err(false);
        }
        hex = true;
    } else if let Some(f) = rest.strip_prefix('.') {
        let n = digits(f, 10);
        if f[n..].starts_with(['e', 'E']) && f[n + 1..].starts_with(|c: char| c.is_ascii_digit()) {
            return Err(false);
        }
        fraction = format!("0.{}", &f[..n]).parse().unwrap_or(0.0);
        rest = &f[n..];
    }
    let mul: u64 = match rest.chars().next().map(|c| c.to_ascii_uppercase()) {
        Some('B') => 1,
        Some('K') => 1 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some('T') => 1 << 40,
        Some('P') => 1 << 50,
        Some('E') => 1 << 60,
        _ => 0,
    };
    let suffixed = mul != 0;
    if suffixed {
        rest = &rest[1..];
    }
    if !rest.is_empty() || (mul <= 1 && fraction != 0.0) {
        return Err(false);
    }
    let mul = mul.max(1);
    let total = val * u128::from(mul) + (fraction * mul as f64) as u128;
    let total = u64::try_from(total).map_err(|_| true)?;
    Ok((total, hex && suffixed))
}

/// A size option's value as QEMU's `parse_option_size` reads it, with its errors.
pub fn option_size(key: &str, s: &str) -> Result<u64, Error> {
    let (n, hex_suffix) = strtosz(s).map_err(|range| {
        Error::msg(if range {
            format!("Value '{s}' is out of range for parameter '{key}'")
        } else {
            format!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            )
        })
    })?;
    if hex_suffix {
        eprintln!("vmm-img: warning: Using a multiplier suffix on hex numbers is deprecated: {s}");
    }
    Ok(n)
}

/// A number option's value as QEMU's `parse_option_number` reads it (`strtoull` with
/// base 0: decimal, `0x` hex or `0` octal), with its error.
pub fn option_number(key: &str, s: &str) -> Result<u64, Error> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    };
    n.ok_or_else(|| Error::msg(format!("Parameter '{key}' expects a number")))
}

/// Turns the string values of size options (QEMU's `QEMU_OPT_SIZE`) into numbers, as the
/// legacy option parser of each driver does (`size=64k` for null-co), in the whole tree.
pub fn parse_sizes(v: &mut Value) -> Result<(), Error> {
    match v {
        Value::Object(m) => {
            let driver = m.get("driver").and_then(Value::as_str).unwrap_or_default();
            let keys = SIZE_OPTS
                .iter()
                .find(|(d, _)| *d == driver)
                .map_or(&[][..], |(_, k)| k);
            for (k, x) in m.iter_mut() {
                match x {
                    Value::String(s) if keys.contains(&k.as_str()) => {
                        *x = Value::from(option_size(k, s)?);
                    }
                    _ => parse_sizes(x)?,
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                parse_sizes(x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `-f DRIVER FILE` for a driver other than qcow2 and raw.
fn plain_tree(name: &str, fmt: &str) -> Result<Value, Error> {
    let mut m = Map::new();
    m.insert("driver".into(), Value::String(fmt.into()));
    if FILE_PROTOCOLS.contains(&fmt) {
        m.insert("filename".into(), Value::String(name.into()));
    } else if fmt == "blkdebug" {
        // QEMU's blkdebug_parse_filename: `blkdebug:[CONFIG]:IMAGE` or the image alone.
        let image = match name.strip_prefix("blkdebug:") {
            Some(rest) => {
                let (config, image) = rest.split_once(':').ok_or_else(|| {
                    Error::msg("blkdebug requires both config file and image path")
                })?;
                if !config.is_empty() {
                    m.insert("config".into(), Value::String(config.into()));
                }
                image
            }
            None => name,
        };
        let mut f = Map::new();
        f.insert("filename".into(), Value::String(image.into()));
        m.insert("image".into(), Value::Object(f));
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
    fn sizes_like_qemu_strtosz() {
        let ok = |s: &str| strtosz(s).map(|(n, _)| n);
        assert_eq!(ok("64k"), Ok(65536));
        assert_eq!(ok(" 64K"), Ok(65536));
        assert_eq!(ok("1.5k"), Ok(1536));
        assert_eq!(ok("1.k"), Ok(1024));
        assert_eq!(ok("0.5k"), Ok(512));
        assert_eq!(ok("1B"), Ok(1));
        assert_eq!(ok("010"), Ok(10));
        assert_eq!(ok("0x1000"), Ok(4096));
        assert_eq!(strtosz("0x10k"), Ok((16384, true)));
        for bad in [
            "", "abc", "1.5", ".5k", "-1", "64k-", "1e3", "1.5e1k", "4.1b", "1kB",
        ] {
            assert_eq!(strtosz(bad), Err(false), "{bad}");
        }
        for big in ["16E", "99999999999999999999"] {
            assert_eq!(strtosz(big), Err(true), "{big}");
        }
        let mut v = json!({"driver": "raw", "offset": "4k", "file": {"driver": "null-co",
            "size": "1M", "latency-ns": "7"}});
        parse_sizes(&mut v).unwrap();
        assert_eq!(
            v,
            json!({"driver": "raw", "offset": 4096, "file": {"driver": "null-co",
                "size": 1048576, "latency-ns": "7"}})
        );
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
            json!({"driver": "raw", "backing": null,
                "file": {"driver": "file", "filename": "null-co://"}})
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
