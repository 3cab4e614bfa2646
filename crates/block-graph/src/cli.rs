//! `--blockdev` arguments in QEMU's two forms: JSON (`{"driver": "qcow2", ...}`) and
//! dotted key=value (`driver=qcow2,node-name=d,file.driver=file,file.filename=/x`), both
//! producing the `BlockdevOptions` `blockdev-add` takes.
//!
//! The key=value form follows QEMU's `keyval_parse` (dotted keys build nested objects,
//! numeric fragments build lists, `,,` is a literal comma, the first value may omit
//! `driver=`), and its values, all strings, are converted to the types the schema expects
//! as QEMU's keyval input visitor does (`on`/`off` for booleans, integers in any base), with
//! QEMU's messages.
//!
//! ```
//! use block_graph::cli::parse_blockdev_arg;
//!
//! let a = parse_blockdev_arg("driver=qcow2,node-name=d,file.driver=file,file.filename=/x").unwrap();
//! let b = parse_blockdev_arg(r#"{"driver": "qcow2", "node-name": "d",
//!     "file": {"driver": "file", "filename": "/x"}}"#).unwrap();
//! assert_eq!(a, b);
//! assert_eq!(
//!     parse_blockdev_arg("null-co,node-name=n,size=abc").unwrap_err().to_string(),
//!     "Parameter 'size' expects integer"
//! );
//! ```

use std::collections::HashMap;

use qapi_types::{BlockdevOptions, QapiType};
use serde_json::{Map, Value};

use crate::error::{BlockError, Result};

fn err(m: impl Into<String>) -> BlockError {
    BlockError::generic(m)
}

/// Whether `s` starts a valid QAPI name fragment; returns its length.
fn qapi_name_len(s: &str) -> usize {
    let b = s.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphabetic() {
        return 0;
    }
    b.iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'-' || **c == b'_')
        .count()
}

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// Puts `value` (a string, or `None` for an inner object) at `frag` of `cur`.
fn put<'a>(
    cur: &'a mut Map<String, Value>,
    frag: &str,
    value: Option<String>,
    key_so_far: &str,
) -> Result<&'a mut Value> {
    let want_obj = value.is_none();
    match cur.get(frag) {
        Some(Value::Object(_)) if want_obj => {}
        Some(Value::String(_)) if !want_obj => {}
        Some(_) => {
            return Err(err(format!(
                "Parameters '{key_so_far}.*' used inconsistently"
            )));
        }
        None => {}
    }
    match value {
        Some(v) => {
            cur.insert(frag.to_string(), Value::String(v));
        }
        None => {
            cur.entry(frag.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    Ok(cur.get_mut(frag).expect("just inserted"))
}

/// QEMU's `keyval_parse`: a tree of objects, lists and string leaves.
pub fn keyval_parse(params: &str, implied_key: Option<&str>) -> Result<Value> {
    let mut root = Map::new();
    let mut s = params;
    let mut implied = implied_key;
    while !s.is_empty() {
        let len = s.find(['=', ',']).unwrap_or(s.len());
        let (key, use_implied) = match implied {
            Some(k) if len > 0 && s.as_bytes().get(len) != Some(&b'=') => (k, true),
            _ => (&s[..len], false),
        };
        implied = None;
        // Walk the fragments.
        let mut frags: Vec<&str> = Vec::new();
        let mut rest = key;
        loop {
            let n = if !frags.is_empty() && rest.starts_with(|c: char| c.is_ascii_digit()) {
                rest.bytes().take_while(|c| c.is_ascii_digit()).count()
            } else {
                qapi_name_len(rest)
            };
            if n == 0 || (n < rest.len() && rest.as_bytes()[n] != b'.') {
                return Err(err(format!("Invalid parameter '{key}'")));
            }
            if n > 127 {
                let whole = frags.is_empty() && n == key.len();
                return Err(err(format!(
                    "Parameter{} '{}' is too long",
                    if whole { "" } else { " fragment" },
                    &rest[..n]
                )));
            }
            frags.push(&rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                break;
            }
            rest = &rest[1..];
        }
        let mut v = String::new();
        let mut p = if use_implied {
            s
        } else {
            let after = &s[len..];
            if !after.starts_with('=') {
                return Err(err(format!("Expected '=' after parameter '{key}'")));
            }
            &after[1..]
        };
        loop {
            match p.find(',') {
                None => {
                    v.push_str(p);
                    p = "";
                    break;
                }
                Some(i) => {
                    v.push_str(&p[..i]);
                    if p[i + 1..].starts_with(',') {
                        v.push(',');
                        p = &p[i + 2..];
                    } else {
                        p = &p[i + 1..];
                        break;
                    }
                }
            }
        }
        s = p;
        // Insert along the path.
        let mut cur = &mut root;
        let mut so_far = String::new();
        for (i, f) in frags.iter().enumerate() {
            if i > 0 {
                so_far.push('.');
            }
            so_far.push_str(f);
            let last = i + 1 == frags.len();
            let slot = put(cur, f, if last { Some(v.clone()) } else { None }, &so_far)?;
            if last {
                break;
            }
            cur = slot.as_object_mut().expect("object");
        }
    }
    listify(Value::Object(root), "")
}

/// Turns objects whose keys are all indexes into lists (QEMU's `keyval_listify`).
fn listify(v: Value, key: &str) -> Result<Value> {
    let Value::Object(m) = v else { return Ok(v) };
    let mut out = Map::new();
    let (mut has_index, mut has_member) = (false, false);
    for (k, val) in m {
        if is_index(&k) {
            has_index = true;
        } else {
            has_member = true;
        }
        let sub = listify(val, &format!("{key}{k}."))?;
        out.insert(k, sub);
    }
    if has_index && has_member {
        return Err(err(format!("Parameters '{key}*' used inconsistently")));
    }
    if !has_index {
        return Ok(Value::Object(out));
    }
    let mut items: HashMap<usize, Value> = HashMap::new();
    for (k, val) in out {
        let i: usize = k.parse().unwrap_or(usize::MAX);
        items.insert(i, val);
    }
    let n = items.len();
    let mut list = Vec::with_capacity(n);
    for i in 0..n {
        match items.remove(&i) {
            Some(x) => list.push(x),
            None => return Err(err(format!("Parameter '{key}{i}' missing"))),
        }
    }
    Ok(Value::Array(list))
}

/// The introspected schema, by (masked) type name.
struct Schema {
    by_name: HashMap<&'static str, &'static Value>,
}

impl Schema {
    fn get() -> Schema {
        let all = qapi_types::full_schema_info();
        Schema {
            by_name: all
                .iter()
                .filter_map(|v| Some((v.get("name")?.as_str()?, v)))
                .collect(),
        }
    }

    fn blockdev_options_type(&self) -> Option<&'static str> {
        self.by_name.get("blockdev-add")?.get("arg-type")?.as_str()
    }
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v: i128 = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i128::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse().ok()?
    };
    let v = if neg { -v } else { v };
    if v > u64::MAX as i128 || v < i64::MIN as i128 {
        return None;
    }
    Some(v as i64)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Converts keyval strings to the types `ty` expects (QEMU's keyval input visitor).
fn convert(s: &Schema, v: Value, ty: &str, path: &str) -> Result<Value> {
    let Some(info) = s.by_name.get(ty) else {
        return Ok(v);
    };
    let meta = info["meta-type"].as_str().unwrap_or("");
    match (meta, v) {
        ("builtin", Value::String(x)) => {
            let json = info["json-type"].as_str().unwrap_or("");
            match json {
                "int" => match parse_int(&x) {
                    Some(i) if ty.starts_with('u') || ty == "size" => Ok(Value::from(i as u64)),
                    Some(i) => Ok(Value::from(i)),
                    None => Err(err(format!("Parameter '{path}' expects integer"))),
                },
                "boolean" => parse_bool(&x)
                    .map(Value::Bool)
                    .ok_or_else(|| err(format!("Parameter '{path}' expects 'on' or 'off'"))),
                "number" => x
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| err(format!("Parameter '{path}' expects number"))),
                _ => Ok(Value::String(x)),
            }
        }
        ("array", Value::Array(items)) => {
            let et = info["element-type"].as_str().unwrap_or("");
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| convert(s, x, et, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>>>()
                .map(Value::Array)
        }
        ("object", Value::Object(mut m)) => {
            let mut types: HashMap<String, String> = HashMap::new();
            let mut add_members = |o: &Value| {
                for mem in o["members"].as_array().into_iter().flatten() {
                    if let (Some(n), Some(t)) = (mem["name"].as_str(), mem["type"].as_str()) {
                        types.insert(n.to_string(), t.to_string());
                    }
                }
            };
            add_members(info);
            if let Some(tag) = info.get("tag").and_then(Value::as_str) {
                if let Some(Value::String(case)) = m.get(tag) {
                    let variant = info["variants"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|x| x["case"].as_str() == Some(case.as_str()))
                        .and_then(|x| x["type"].as_str())
                        .and_then(|t| s.by_name.get(t));
                    if let Some(vt) = variant {
                        add_members(vt);
                    }
                }
            }
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if let Some(t) = types.get(&k) {
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let val = m.remove(&k).expect("present");
                    m.insert(k.clone(), convert(s, val, t, &sub)?);
                }
            }
            Ok(Value::Object(m))
        }
        ("alternate", v) => {
            let branches: Vec<&Value> = info["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["type"].as_str().and_then(|t| s.by_name.get(t).copied()))
                .collect();
            let is_obj = v.is_object();
            let pick = branches.iter().find(|b| {
                let meta = b["meta-type"].as_str().unwrap_or("");
                if is_obj {
                    meta == "object"
                } else {
                    meta == "enum" || (meta == "builtin" && b["json-type"] == "string")
                }
            });
            match pick {
                Some(b) => convert(s, v, b["name"].as_str().unwrap_or(""), path),
                None => Ok(v),
            }
        }
        (_, v) => Ok(v),
    }
}

/// Parses a `--blockdev` argument (JSON or key=value) into `blockdev-add`'s options.
pub fn parse_blockdev_arg(arg: &str) -> Result<BlockdevOptions> {
    if arg.trim_start().starts_with('{') {
        let v = serde_json::from_str::<Value>(arg)
            .map_err(|e| err(format!("JSON parse error, {e}")))?;
        return BlockdevOptions::from_qmp_strict(v).map_err(|e| err(e.to_string()));
    }
    blockdev_options_from_tree(keyval_parse(arg, Some("driver"))?)
}

/// `blockdev-add`'s options from a tree whose leaves may be strings where the schema wants
/// integers, booleans or numbers (what [`keyval_parse`] builds, and what QEMU's legacy
/// `json:` file names and qemu-img's `--image-opts` carry): string leaves are converted as
/// QEMU's keyval input visitor does, other values are taken as they are.
///
/// ```
/// use block_graph::cli::blockdev_options_from_tree;
/// use serde_json::json;
///
/// let o = blockdev_options_from_tree(json!({"driver": "null-co", "size": "0x1000",
///     "read-zeroes": true})).unwrap();
/// assert_eq!(o, block_graph::parse_blockdev_arg("null-co,size=4096,read-zeroes=on").unwrap());
/// ```
pub fn blockdev_options_from_tree(tree: Value) -> Result<BlockdevOptions> {
    let s = Schema::get();
    let v = match s.blockdev_options_type() {
        Some(t) => convert(&s, tree, t, "")?,
        None => tree,
    };
    BlockdevOptions::from_qmp_strict(v).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_builds_trees_and_lists() {
        assert_eq!(
            keyval_parse("null-co,a.b=1,a.c=x,,y,l.1=b,l.0=a", Some("driver")).unwrap(),
            json!({"driver": "null-co", "a": {"b": "1", "c": "x,y"}, "l": ["a", "b"]})
        );
        assert_eq!(
            keyval_parse("a=1,a=2", None).unwrap(),
            json!({"a": "2"}),
            "the last one wins"
        );
        let e = |s: &str| keyval_parse(s, Some("driver")).unwrap_err().to_string();
        assert_eq!(e("driver=x,x.1=a"), "Parameter 'x.0' missing");
        assert_eq!(e("driver=x,size"), "Expected '=' after parameter 'size'");
        assert_eq!(
            e("driver=x,size.a=1,size=2"),
            "Parameters 'size.*' used inconsistently"
        );
        assert_eq!(e("driver=x,a..b=1"), "Invalid parameter 'a..b'");
        assert_eq!(
            e("driver=x,l.0=a,l.b=c"),
            "Parameters 'l.*' used inconsistently"
        );
    }

    #[test]
    fn both_forms_give_the_same_options() {
        let a = parse_blockdev_arg(
            "driver=qcow2,node-name=d,file.driver=file,file.filename=/x,cache.direct=on,\
             read-only=off,l2-cache-size=0x100000,overlap-check=all,backing.driver=null-co,\
             backing.size=512",
        )
        .unwrap();
        let b = parse_blockdev_arg(
            r#"{"driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": "/x"},
                "cache": {"direct": true}, "read-only": false, "l2-cache-size": 1048576,
                "overlap-check": "all", "backing": {"driver": "null-co", "size": 512}}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        let c = parse_blockdev_arg(
            "null-co,node-name=n,id=x,stats-intervals.0=60,stats-intervals.1=3600",
        )
        .unwrap();
        assert_eq!(c.stats_intervals, Some(vec![60, 3600]));
        let d = parse_blockdev_arg("driver=qcow2,node-name=q,file=f,backing=b").unwrap();
        assert_eq!(d.to_qmp()["backing"], "b");
        let e = parse_blockdev_arg("driver=qcow2,node-name=q,file=f,overlap-check.template=none,overlap-check.main-header=on").unwrap();
        assert_eq!(
            e.to_qmp()["overlap-check"],
            json!({"template": "none", "main-header": true})
        );
    }

    #[test]
    fn errors_are_qemus() {
        let e = |s: &str| parse_blockdev_arg(s).unwrap_err().to_string();
        assert_eq!(
            e("driver=null-co,node-name=n,size=abc"),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,read-zeroes=maybe"),
            "Parameter 'read-zeroes' expects 'on' or 'off'"
        );
        assert_eq!(
            e("driver=raw,node-name=r,file.driver=null-co,file.size=1M"),
            "Parameter 'file.size' expects integer"
        );
        assert_eq!(
            e(r#"{"driver":"null-co","node-name":"n","size":"1"}"#),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert!(e(r#"{"driver":"#).starts_with("JSON parse error"));
        assert_eq!(
            e("driver=null-co,node-name=n,x=1"),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(e("node-name=n"), "Parameter 'driver' is missing");
        assert!(parse_blockdev_arg("null-co,node-name=n,read-zeroes=yes,size=0x1000").is_ok());
    }
}
