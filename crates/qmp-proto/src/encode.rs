//! Encoding JSON the way QEMU 7.2 prints it on a QMP monitor.
//!
//! QEMU prints compact JSON with `": "` after keys and `", "` between
//! members, ASCII only (everything else as `\uXXXX` with upper-case hex,
//! astral characters as surrogate pairs, DEL too), numbers as `%" PRId64 "`
//! or `%.17g`, and each message followed by CRLF.
//!
//! QEMU's dictionaries are hash tables, so it prints members in the order
//! of their hash buckets, not in insertion order. [`KeyOrder::Qemu`]
//! reproduces that order (which is why QEMU says `{"return": {}, "id": 1}`
//! but `{"id": 1, "error": ...}`), so output can match QEMU byte for byte.
//!
//! ```
//! use qmp_proto::encode::{to_string, KeyOrder};
//! use serde_json::json;
//! let v = json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "é"});
//! assert_eq!(
//!     to_string(&v, KeyOrder::Qemu),
//!     r#"{"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "\u00E9"}"#
//! );
//! assert_eq!(
//!     to_string(&v, KeyOrder::Insertion),
//!     r#"{"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "\u00E9"}"#
//! );
//! ```

use serde_json::{Map, Number, Value};

use crate::json::utf8::is_valid_codepoint;

/// The order in which object members are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyOrder {
    /// QEMU 7.2's `QDict` iteration order (hash buckets; within a bucket,
    /// the member inserted last first). Byte-for-byte equal output.
    #[default]
    Qemu,
    /// The order of the `serde_json::Map` (insertion order).
    Insertion,
}

/// Number of hash buckets of QEMU's `QDict`.
const QDICT_BUCKET_MAX: u32 = 512;

/// The `QDict` bucket QEMU puts `key` in (its `tdb_hash` modulo 512).
pub fn qdict_bucket(key: &str) -> u32 {
    // QEMU's keys are C strings.
    let bytes = key.as_bytes();
    let bytes = match bytes.iter().position(|&b| b == 0) {
        Some(n) => &bytes[..n],
        None => bytes,
    };
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKET_MAX
}

/// The members of `map` in the given order.
pub fn ordered_members(map: &Map<String, Value>, order: KeyOrder) -> Vec<(&String, &Value)> {
    let mut members: Vec<(&String, &Value)> = map.iter().collect();
    if order == KeyOrder::Qemu && members.len() > 1 {
        let mut keyed: Vec<(u32, usize, (&String, &Value))> = members
            .into_iter()
            .enumerate()
            .map(|(i, m)| (qdict_bucket(m.0), i, m))
            .collect();
        // Bucket ascending; within a bucket the newest entry comes first.
        keyed.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        members = keyed.into_iter().map(|(_, _, m)| m).collect();
    }
    members
}

enum Frame<'a> {
    Array(std::slice::Iter<'a, Value>, bool),
    Object(std::vec::IntoIter<(&'a String, &'a Value)>, bool),
}

/// Appends the compact QEMU encoding of `value` to `out`.
///
/// It never recurses, so any depth is fine.
pub fn write_value(out: &mut Vec<u8>, value: &Value, order: KeyOrder) {
    let mut stack: Vec<Frame<'_>> = Vec::new();
    let mut next = Some(value);
    loop {
        if let Some(v) = next.take() {
            match v {
                Value::Null => out.extend_from_slice(b"null"),
                Value::Bool(true) => out.extend_from_slice(b"true"),
                Value::Bool(false) => out.extend_from_slice(b"false"),
                Value::Number(n) => write_number(out, n),
                Value::String(s) => write_str(out, s),
                Value::Array(items) => {
                    out.push(b'[');
                    stack.push(Frame::Array(items.iter(), true));
                }
                Value::Object(map) => {
                    out.push(b'{');
                    stack.push(Frame::Object(ordered_members(map, order).into_iter(), true));
                }
            }
        }
        let Some(top) = stack.last_mut() else {
            return;
        };
        match top {
            Frame::Array(iter, first) => match iter.next() {
                Some(v) => {
                    if !*first {
                        out.extend_from_slice(b", ");
                    }
                    *first = false;
                    next = Some(v);
                }
                None => {
                    out.push(b']');
                    stack.pop();
                }
            },
            Frame::Object(iter, first) => match iter.next() {
                Some((k, v)) => {
                    if !*first {
                        out.extend_from_slice(b", ");
                    }
                    *first = false;
                    write_str(out, k);
                    out.extend_from_slice(b": ");
                    next = Some(v);
                }
                None => {
                    out.push(b'}');
                    stack.pop();
                }
            },
        }
    }
}

/// Appends `value` and the CRLF that ends every QMP message.
pub fn write_message(out: &mut Vec<u8>, value: &Value, order: KeyOrder) {
    write_value(out, value, order);
    out.extend_from_slice(b"\r\n");
}

/// The compact QEMU encoding of `value` (without line end).
pub fn to_string(value: &Value, order: KeyOrder) -> String {
    let mut out = Vec::new();
    write_value(&mut out, value, order);
    // Everything written is ASCII.
    String::from_utf8(out).unwrap_or_default()
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        out.extend_from_slice(format_g17(f).as_bytes());
    }
}

/// C's `printf("%.17g", v)` for a finite `v`.
pub(crate) fn format_g17(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    if !v.is_finite() {
        // Not reachable from serde_json values; QEMU would print these.
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    // 17 significant digits, correctly rounded: "d.dddddddddddddddde<exp>".
    let sci = format!("{:.16e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::new();
    if v < 0.0 {
        out.push('-');
    }
    if !(-4..17).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        let rest = rest.trim_end_matches('0');
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
    } else if exp >= 0 {
        let split = (exp as usize + 1).min(digits.len());
        let (int, frac) = digits.split_at(split);
        out.push_str(int);
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits.trim_end_matches('0'));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_u16_escape(out: &mut Vec<u8>, cp: u32) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(HEX[((cp >> shift) & 0xF) as usize]);
    }
}

/// Appends `s` as a QEMU-quoted string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if (0x20..0x7F).contains(&b) && b != b'"' && b != b'\\' {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[run_start..i]);
        if b < 0x80 {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0C => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => push_u16_escape(out, u32::from(b)),
            }
            i += 1;
        } else {
            // A multi-byte character: decode it from the (valid) str.
            let c = s[i..].chars().next().unwrap_or('\u{FFFD}');
            let mut cp = u32::from(c);
            if !is_valid_codepoint(cp) {
                cp = 0xFFFD; // QEMU refuses noncharacters
            }
            if cp > 0xFFFF {
                let v = cp - 0x10000;
                push_u16_escape(out, 0xD800 + (v >> 10));
                push_u16_escape(out, 0xDC00 + (v & 0x3FF));
            } else {
                push_u16_escape(out, cp);
            }
            i += c.len_utf8();
        }
        run_start = i;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn buckets_match_qemu_observed_order() {
        // Orders observed on qemu-storage-daemon 7.2's monitor.
        let q = |v: Value| to_string(&v, KeyOrder::Qemu);
        assert_eq!(
            q(json!({"return": {}, "id": 1})),
            r#"{"return": {}, "id": 1}"#
        );
        assert_eq!(
            q(json!({"error": {"class": "C", "desc": "d"}, "id": "x"})),
            r#"{"id": "x", "error": {"class": "C", "desc": "d"}}"#
        );
        assert_eq!(
            q(
                json!({"event": "E", "timestamp": {"seconds": 1, "microseconds": 2}, "data": {"status": "created", "id": "j"}})
            ),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "E", "data": {"status": "created", "id": "j"}}"#
        );
        assert_eq!(
            q(json!({"z": 1, "a": 2, "m": [true, false, null]})),
            r#"{"a": 2, "z": 1, "m": [true, false, null]}"#
        );
        assert_eq!(
            q(
                json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "p"}, "capabilities": ["oob"]}})
            ),
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "p"}, "capabilities": ["oob"]}}"#
        );
    }

    #[test]
    fn strings_are_ascii_like_qemu() {
        let s = to_string(
            &json!("\u{e9}\u{1F600}\u{7f}/\u{1}\"\\\u{8}\u{c}\n\r\t\u{FFFF}\0"),
            KeyOrder::Qemu,
        );
        assert_eq!(
            s,
            r#""\u00E9\uD83D\uDE00\u007F/\u0001\"\\\b\f\n\r\t\uFFFD\u0000""#
        );
    }

    #[test]
    fn floats_like_printf_g17() {
        let cases = [
            (1.0, "1"),
            (0.1, "0.10000000000000001"),
            (1e20, "1e+20"),
            (1e-5, "1.0000000000000001e-05"),
            (1.2345678901234568e29, "1.2345678901234568e+29"),
            (1500.0, "1500"),
            (-2.5, "-2.5"),
            (-0.0, "-0"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "4.9406564584124654e-324"),
        ];
        for (v, s) in cases {
            assert_eq!(format_g17(v), s, "{v}");
        }
        assert_eq!(
            to_string(&json!([1, -1, u64::MAX, 0.5]), KeyOrder::Qemu),
            "[1, -1, 18446744073709551615, 0.5]"
        );
    }

    #[test]
    fn deep_values_do_not_recurse() {
        let mut v = json!(1);
        for _ in 0..10_000 {
            v = Value::Array(vec![v]);
        }
        let s = to_string(&v, KeyOrder::Qemu);
        assert_eq!(s.len(), 20_001);
        // serde_json's Drop recurses; take it apart iteratively.
        let mut cur = v;
        while let Value::Array(mut items) = cur {
            cur = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn message_ends_with_crlf() {
        let mut out = Vec::new();
        write_message(&mut out, &json!({}), KeyOrder::Qemu);
        assert_eq!(out, b"{}\r\n");
    }
}
