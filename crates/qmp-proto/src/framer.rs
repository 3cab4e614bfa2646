//! Splitting a byte stream into JSON messages, like QEMU's `json-lexer.c`
//! and `json-streamer.c`.
//!
//! A [`Framer`] accepts input in pieces of any size: a message split over
//! many reads, or many messages in one read. It yields one
//! `Result<Value, ParseError>` per top-level value, in input order.
//!
//! It follows QEMU 7.2 token for token (the same messages for the same
//! input), with one deliberate improvement: when a message crosses one of
//! the [`Limits`], QEMU resets and lexes the rest of that message as fresh
//! input (producing a cascade of errors); the framer instead reports one
//! error and skips the rest of the offending message, tracking strings and
//! nesting, so the next message is read normally.
//!
//! Error recovery otherwise matches QEMU: after a lexical error ("stray")
//! input is dropped up to the next structural character (`[]{}:,`), ASCII
//! control character other than tab, or byte `0xFE`/`0xFF`. Clients can send
//! such a byte to force the parser into a known state.
//!
//! Memory: the framer holds at most one message's tokens, bounded by
//! [`Limits::max_message_size`] plus one separator byte per token; it never
//! recurses, whatever the depth.
//!
//! ```
//! use qmp_proto::framer::Framer;
//! let mut f = Framer::new();
//! assert!(f.feed(b"{\"execute\": \"qu").is_empty());
//! let out = f.feed(b"it\"} [1 2]\n");
//! assert_eq!(out.len(), 2);
//! assert_eq!(out[0].as_ref().unwrap()["execute"], "quit");
//! assert_eq!(
//!     out[1].as_ref().unwrap_err().to_string(),
//!     "JSON parse error, expected separator in list"
//! );
//! ```

use serde_json::Value;

use crate::json::utf8::lossy;
use crate::json::{cap_message, parse_tokens, Limits, ParseError, ParseErrorKind};

/// How much of a token is kept for a "stray" message while skipping.
const STRAY_KEEP: usize = 1100;
/// Buffers grown past this are released after their message.
const SHRINK_ABOVE: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    Recovery,
    Dq,
    DqEsc,
    Sq,
    SqEsc,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Int,
    Float,
    Keyword,
}

/// An incremental splitter and parser of QMP's JSON stream.
#[derive(Debug)]
pub struct Framer {
    limits: Limits,
    st: St,
    /// The completed tokens of the current message (numbers and keywords
    /// followed by a space), then the current partial token.
    buf: Vec<u8>,
    tok_start: usize,
    /// Length of the current partial token (even the bytes not kept).
    tok_len: usize,
    brace: i64,
    bracket: i64,
    token_count: usize,
    token_size: usize,
    /// Skipping the rest of a message after a limit error; the value is the
    /// nesting depth still open.
    discard: Option<i64>,
    pending: Option<ParseError>,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    /// A framer with QEMU's limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A framer with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Framer {
            limits,
            st: St::Start,
            buf: Vec::new(),
            tok_start: 0,
            tok_len: 0,
            brace: 0,
            bracket: 0,
            token_count: 0,
            token_size: 0,
            discard: None,
            pending: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes currently held for the message being received.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The most [`buffered_bytes`](Self::buffered_bytes) can ever be with
    /// these limits, whatever the input: one message's tokens, one separator
    /// per token, and the start of a token kept for an error message.
    pub fn max_buffered_bytes(&self) -> usize {
        self.limits.max_message_size + self.limits.max_token_count + STRAY_KEEP
    }

    /// Whether the framer is between messages: no partial token or value
    /// is pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.st, St::Start | St::Recovery)
            && self.token_count == 0
            && self.discard.is_none()
    }

    /// Forgets any partial message and lexer state.
    pub fn reset(&mut self) {
        self.st = St::Start;
        self.discard = None;
        self.pending = None;
        self.reset_message();
    }

    /// Processes all of `input` and returns the results it completes.
    pub fn feed(&mut self, mut input: &[u8]) -> Vec<Result<Value, ParseError>> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, item) = self.advance(input);
            out.extend(item);
            input = &input[used..];
        }
        out
    }

    /// Signals the end of the input: completes a number or keyword still
    /// waiting for its terminator, reports an unterminated string, and
    /// reports a value left incomplete (`premature EOI`).
    pub fn finish(&mut self) -> Vec<Result<Value, ParseError>> {
        let mut out = Vec::new();
        let end_kind = match self.st {
            St::Start | St::Recovery => None,
            St::Zero | St::Digits => Some(Kind::Int),
            St::MantissaDigits | St::ExpDigits => Some(Kind::Float),
            St::Keyword => Some(Kind::Keyword),
            St::Dq
            | St::DqEsc
            | St::Sq
            | St::SqEsc
            | St::Sign
            | St::Mantissa
            | St::ExpE
            | St::ExpSign => {
                out.push(self.lex_error());
                None
            }
        };
        self.st = St::Start;
        if let Some(kind) = end_kind {
            out.extend(self.end_token(kind));
        }
        out.extend(self.pending.take().map(Err));
        if self.discard.take().is_some() {
            self.reset_message();
        } else if self.token_count > 0 {
            out.push(parse_tokens(&self.buf));
            self.reset_message();
        }
        out
    }

    /// Processes `input` until one result is complete or the input is used
    /// up. Returns how many bytes were consumed and the result, if any; call
    /// again with the rest of the input.
    pub fn advance(&mut self, input: &[u8]) -> (usize, Option<Result<Value, ParseError>>) {
        let n = input.len();
        let mut i = 0;
        while i < n {
            let b = input[i];
            match self.st {
                St::Start => {
                    i += 1;
                    let single = match b {
                        b' ' | b'\t' | b'\r' | b'\n' => continue,
                        b'{' => Kind::LCurly,
                        b'}' => Kind::RCurly,
                        b'[' => Kind::LSquare,
                        b']' => Kind::RSquare,
                        b':' => Kind::Colon,
                        b',' => Kind::Comma,
                        _ => {
                            self.begin();
                            let next = match b {
                                b'"' => St::Dq,
                                b'\'' => St::Sq,
                                b'0' => St::Zero,
                                b'1'..=b'9' => St::Digits,
                                b'-' => St::Sign,
                                b'a'..=b'z' => St::Keyword,
                                _ => {
                                    self.push_unchecked(b);
                                    return (i, Some(self.lex_error()));
                                }
                            };
                            self.consume(&[b]);
                            self.st = next;
                            if let Some(e) = self.pending.take() {
                                return (i, Some(Err(e)));
                            }
                            continue;
                        }
                    };
                    self.begin();
                    self.push_unchecked(b);
                    if let Some(r) = self.end_token(single) {
                        return (i, Some(r));
                    }
                }
                St::Recovery => {
                    if recovery_stops(b) {
                        self.st = St::Start;
                    } else {
                        i += 1;
                        while i < n && !recovery_stops(input[i]) {
                            i += 1;
                        }
                    }
                }
                St::Dq | St::Sq => {
                    let quote = if self.st == St::Dq { b'"' } else { b'\'' };
                    let run = scan_string(&input[i..], quote);
                    if run > 0 {
                        self.consume(&input[i..i + run]);
                        i += run;
                    } else {
                        i += 1;
                        if b == quote {
                            self.consume(&[b]);
                            self.st = St::Start;
                            if let Some(r) = self.end_token(Kind::Str) {
                                return (i, Some(r));
                            }
                        } else if b == b'\\' {
                            self.consume(&[b]);
                            self.st = if quote == b'"' { St::DqEsc } else { St::SqEsc };
                        } else {
                            self.push_unchecked(b);
                            return (i, Some(self.lex_error()));
                        }
                    }
                }
                St::DqEsc | St::SqEsc => {
                    i += 1;
                    if (0x20..=0xFD).contains(&b) {
                        self.consume(&[b]);
                        self.st = if self.st == St::DqEsc { St::Dq } else { St::Sq };
                    } else {
                        self.push_unchecked(b);
                        return (i, Some(self.lex_error()));
                    }
                }
                St::Zero => match b {
                    b'0'..=b'9' => {
                        i += 1;
                        self.push_unchecked(b);
                        return (i, Some(self.lex_error()));
                    }
                    b'.' => {
                        i += 1;
                        self.consume(&[b]);
                        self.st = St::Mantissa;
                    }
                    _ => {
                        if let Some(r) = self.end_lookahead(Kind::Int) {
                            return (i, Some(r));
                        }
                    }
                },
                St::Sign => {
                    i += 1;
                    match b {
                        b'0' => self.st = St::Zero,
                        b'1'..=b'9' => self.st = St::Digits,
                        _ => {
                            self.push_unchecked(b);
                            return (i, Some(self.lex_error()));
                        }
                    }
                    self.consume(&[b]);
                }
                St::Digits | St::MantissaDigits | St::ExpDigits => {
                    let run = input[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                    if run > 0 {
                        self.consume(&input[i..i + run]);
                        i += run;
                    } else {
                        match (self.st, b) {
                            (St::Digits | St::MantissaDigits, b'e' | b'E') => {
                                i += 1;
                                self.consume(&[b]);
                                self.st = St::ExpE;
                            }
                            (St::Digits, b'.') => {
                                i += 1;
                                self.consume(&[b]);
                                self.st = St::Mantissa;
                            }
                            _ => {
                                let kind = if self.st == St::Digits {
                                    Kind::Int
                                } else {
                                    Kind::Float
                                };
                                if let Some(r) = self.end_lookahead(kind) {
                                    return (i, Some(r));
                                }
                            }
                        }
                    }
                }
                St::Mantissa | St::ExpSign => {
                    i += 1;
                    if b.is_ascii_digit() {
                        self.consume(&[b]);
                        self.st = if self.st == St::Mantissa {
                            St::MantissaDigits
                        } else {
                            St::ExpDigits
                        };
                    } else {
                        self.push_unchecked(b);
                        return (i, Some(self.lex_error()));
                    }
                }
                St::ExpE => {
                    i += 1;
                    match b {
                        b'+' | b'-' => self.st = St::ExpSign,
                        b'0'..=b'9' => self.st = St::ExpDigits,
                        _ => {
                            self.push_unchecked(b);
                            return (i, Some(self.lex_error()));
                        }
                    }
                    self.consume(&[b]);
                }
                St::Keyword => {
                    let run = input[i..]
                        .iter()
                        .take_while(|c| c.is_ascii_lowercase())
                        .count();
                    if run > 0 {
                        self.consume(&input[i..i + run]);
                        i += run;
                    } else if let Some(r) = self.end_lookahead(Kind::Keyword) {
                        return (i, Some(r));
                    }
                }
            }
            if let Some(e) = self.pending.take() {
                return (i, Some(Err(e)));
            }
        }
        (n, None)
    }

    fn begin(&mut self) {
        self.tok_start = self.buf.len();
        self.tok_len = 0;
    }

    /// Appends bytes of the current token, enforcing the size limits. When
    /// they are crossed, the error is left in `pending` and the rest of the
    /// message is skipped.
    fn consume(&mut self, bytes: &[u8]) {
        let new_len = self.tok_len + bytes.len();
        if self.discard.is_none() {
            if new_len > self.limits.max_token_size
                || self.token_size + new_len + 1 > self.limits.max_message_size
            {
                self.pending = Some(ParseError::new(
                    ParseErrorKind::TokenSize,
                    "JSON token size limit exceeded",
                ));
                // Keep the token's start for a possible "stray" message.
                let depth = self.brace + self.bracket;
                self.buf.drain(..self.tok_start);
                self.buf.truncate(STRAY_KEEP);
                self.clear_counts();
                self.tok_start = 0;
                self.discard = Some(depth);
                self.keep_prefix(bytes);
            } else {
                self.buf.extend_from_slice(bytes);
            }
        } else {
            self.keep_prefix(bytes);
        }
        self.tok_len = new_len;
    }

    fn keep_prefix(&mut self, bytes: &[u8]) {
        let room = STRAY_KEEP.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..room.min(bytes.len())]);
    }

    /// Appends a byte that ends the token (a structural character or the
    /// byte that makes a lexical error); limits are checked at token end.
    fn push_unchecked(&mut self, b: u8) {
        if self.discard.is_none() || self.buf.len() < STRAY_KEEP {
            self.buf.push(b);
        }
        self.tok_len += 1;
    }

    /// Ends a number or keyword on a byte that is not part of it; the byte
    /// is processed again in the start state.
    fn end_lookahead(&mut self, kind: Kind) -> Option<Result<Value, ParseError>> {
        self.st = St::Start;
        self.end_token(kind)
    }

    /// QEMU's `json_message_process_token` for a complete token.
    fn end_token(&mut self, kind: Kind) -> Option<Result<Value, ParseError>> {
        if let Some(depth) = self.discard.as_mut() {
            match kind {
                Kind::LCurly | Kind::LSquare => *depth += 1,
                Kind::RCurly | Kind::RSquare => *depth -= 1,
                _ => {}
            }
            let done = *depth <= 0;
            self.buf.clear();
            self.tok_start = 0;
            self.tok_len = 0;
            if done {
                self.discard = None;
                self.reset_message();
            }
            return None;
        }
        match kind {
            Kind::LCurly => self.brace += 1,
            Kind::RCurly => self.brace -= 1,
            Kind::LSquare => self.bracket += 1,
            Kind::RSquare => self.bracket -= 1,
            _ => {}
        }
        let len = self.tok_len;
        let error = if len > self.limits.max_token_size
            || self.token_size + len + 1 > self.limits.max_message_size
        {
            Some((ParseErrorKind::TokenSize, "JSON token size limit exceeded"))
        } else if self.token_count + 1 > self.limits.max_token_count {
            Some((
                ParseErrorKind::TokenCount,
                "JSON token count limit exceeded",
            ))
        } else if self.brace + self.bracket > self.limits.max_nesting as i64 {
            Some((ParseErrorKind::Nesting, "JSON nesting depth limit exceeded"))
        } else {
            None
        };
        if let Some((kind, msg)) = error {
            let depth = self.brace + self.bracket;
            self.reset_message();
            if depth > 0 {
                self.discard = Some(depth);
            }
            return Some(Err(ParseError::new(kind, msg)));
        }
        self.token_count += 1;
        self.token_size += len;
        if matches!(kind, Kind::Int | Kind::Float | Kind::Keyword) {
            self.buf.push(b' ');
        }
        self.tok_start = self.buf.len();
        self.tok_len = 0;
        if (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0 {
            return None;
        }
        let result = parse_tokens(&self.buf);
        self.reset_message();
        Some(result)
    }

    /// A lexical error: report the token so far, drop the message, and skip
    /// input until a point where a new token can start.
    fn lex_error(&mut self) -> Result<Value, ParseError> {
        let start = self.tok_start.min(self.buf.len());
        let tok = &self.buf[start..];
        let tok = &tok[..tok.len().min(STRAY_KEEP)];
        let msg = cap_message(format!("stray '{}'", lossy(tok)));
        self.discard = None;
        self.reset_message();
        self.st = St::Recovery;
        Err(ParseError::new(
            ParseErrorKind::Lexical,
            format!("JSON parse error, {msg}"),
        ))
    }

    fn clear_counts(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        self.token_count = 0;
        self.token_size = 0;
    }

    fn reset_message(&mut self) {
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.tok_start = 0;
        self.tok_len = 0;
        self.clear_counts();
    }
}

/// Bytes at which error recovery stops (QEMU's `IN_RECOVERY` row).
#[inline]
fn recovery_stops(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b >= 0xFE || matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',')
}

/// Length of the run of ordinary string bytes at the start of `s`: bytes
/// other than `quote`, backslash, control characters and `0xFE`/`0xFF`.
#[inline]
fn scan_string(s: &[u8], quote: u8) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let q = LO * u64::from(quote);
    let bs = LO * u64::from(b'\\');
    let mut i = 0;
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_le_bytes(w);
        let a = w ^ q;
        let c = w ^ bs;
        let hi = !(w | LO); // zero byte where the input byte is 0xFE or 0xFF
        let special = (a.wrapping_sub(LO) & !a)
            | (c.wrapping_sub(LO) & !c)
            | (w.wrapping_sub(LO * 0x20) & !w)
            | (hi.wrapping_sub(LO) & !hi);
        if special & HI != 0 {
            break;
        }
        i += 8;
    }
    i + s[i..]
        .iter()
        .take_while(|&&c| c != quote && c != b'\\' && (0x20..0xFE).contains(&c))
        .count()
}

#[cfg(test)]
mod tests;
