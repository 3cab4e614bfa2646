//! QMP's JSON dialect, as QEMU 7.2 reads it.
//!
//! It is RFC 8259 JSON with two extensions: strings may be single-quoted
//! (`'it\'s'`), and `\'` is a valid escape in both kinds of string. Input is
//! QEMU's "modified UTF-8": `C0 80` stands for U+0000, noncharacters and
//! surrogates are refused. Integers become `i64` when they fit, else `u64`,
//! else `f64`, exactly like QEMU's `QNum`.
//!
//! Error messages are QEMU's (`JSON parse error, ...`), so a client sees the
//! same text from this crate as from QEMU.
//!
//! ```
//! use qmp_proto::json;
//! let v = json::parse(b"{'execute': 'query-status', 'id': 1}").unwrap();
//! assert_eq!(v["execute"], "query-status");
//! let e = json::parse(b"[1 2]").unwrap_err();
//! assert_eq!(e.to_string(), "JSON parse error, expected separator in list");
//! ```

mod parser;
pub(crate) mod utf8;

use serde_json::Value;

use crate::error::QmpError;
use crate::framer::Framer;

pub(crate) use parser::{cap_message, parse_tokens};

/// What kind of problem a [`ParseError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// A byte that cannot start or continue a token (QEMU's "stray").
    Lexical,
    /// Tokens that do not form a value (separators, keys, escapes, UTF-8...).
    Syntax,
    /// A token, or the message's tokens together, exceed the size limit.
    TokenSize,
    /// The message has more tokens than allowed.
    TokenCount,
    /// Objects and arrays are nested deeper than allowed.
    Nesting,
    /// The input held no value, or more than one where one was expected.
    Count,
}

/// A JSON parse error, with QEMU's wording.
///
/// The message (its [`Display`](std::fmt::Display)) is what QEMU puts in the
/// `desc` of its `GenericError` reply, e.g. `JSON parse error, stray '@'`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    kind: ParseErrorKind,
    message: String,
}

impl ParseError {
    pub(crate) fn new(kind: ParseErrorKind, message: impl Into<String>) -> Self {
        ParseError {
            kind,
            message: message.into(),
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> ParseErrorKind {
        self.kind
    }

    /// The message, as QEMU words it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ParseError> for QmpError {
    fn from(e: ParseError) -> Self {
        QmpError::generic(e.message)
    }
}

/// Bounds on one message, the same as QEMU's `json-streamer.c` by default.
///
/// Any message that crosses one of them is answered with an error and its
/// remaining bytes are skipped, so the memory held for a message never
/// exceeds `max_message_size + max_token_count` bytes whatever the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single token (a string, a number...), in bytes. QEMU: 64 MiB.
    pub max_token_size: usize,
    /// Largest sum of the sizes of one message's tokens (whitespace between
    /// tokens not counted, like QEMU). QEMU: 64 MiB.
    pub max_message_size: usize,
    /// Most tokens in one message. QEMU: 2 Mi.
    pub max_token_count: usize,
    /// Deepest nesting of objects and arrays. QEMU: 1024.
    pub max_nesting: usize,
}

impl Limits {
    /// QEMU's `MAX_TOKEN_SIZE`.
    pub const QEMU_MAX_TOKEN_SIZE: usize = 64 << 20;
    /// QEMU's `MAX_TOKEN_COUNT`.
    pub const QEMU_MAX_TOKEN_COUNT: usize = 2 << 20;
    /// QEMU's `MAX_NESTING`.
    pub const QEMU_MAX_NESTING: usize = 1 << 10;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_token_size: Self::QEMU_MAX_TOKEN_SIZE,
            max_message_size: Self::QEMU_MAX_TOKEN_SIZE,
            max_token_count: Self::QEMU_MAX_TOKEN_COUNT,
            max_nesting: Self::QEMU_MAX_NESTING,
        }
    }
}

/// Parses exactly one JSON value (surrounding whitespace allowed) with the
/// default [`Limits`].
pub fn parse(input: &[u8]) -> Result<Value, ParseError> {
    parse_with_limits(input, Limits::default())
}

/// Parses exactly one JSON value with the given limits.
pub fn parse_with_limits(input: &[u8], limits: Limits) -> Result<Value, ParseError> {
    let mut framer = Framer::with_limits(limits);
    let mut results = framer.feed(input);
    results.extend(framer.finish());
    let mut results = results.into_iter();
    match (results.next(), results.next()) {
        (Some(r), None) => r,
        (None, _) => Err(ParseError::new(
            ParseErrorKind::Count,
            "JSON parse error, expecting value",
        )),
        (Some(Err(e)), Some(_)) => Err(e),
        (Some(Ok(_)), Some(_)) => Err(ParseError::new(
            ParseErrorKind::Count,
            "Expecting at most one JSON value",
        )),
    }
}

/// Parses a string of QMP's JSON dialect (see [`parse`]).
pub fn from_str(input: &str) -> Result<Value, ParseError> {
    parse(input.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_one_value() {
        assert_eq!(
            parse(b"  {'a': [1, \"b\"]}  ").unwrap(),
            json!({"a": [1, "b"]})
        );
        assert_eq!(parse(b"12").unwrap(), json!(12));
        assert_eq!(parse(b"").unwrap_err().kind(), ParseErrorKind::Count);
        assert_eq!(
            parse(b"1 2").unwrap_err().to_string(),
            "Expecting at most one JSON value"
        );
        assert_eq!(
            parse(b"[1").unwrap_err().to_string(),
            "JSON parse error, premature EOI"
        );
        assert_eq!(
            parse(b"\"abc").unwrap_err().to_string(),
            "JSON parse error, stray '\"abc'"
        );
    }

    #[test]
    fn parse_error_becomes_generic_error() {
        let e: QmpError = parse(b"@").unwrap_err().into();
        assert_eq!(e.class, crate::ErrorClass::GenericError);
        assert_eq!(e.desc, "JSON parse error, stray '@'");
    }
}
