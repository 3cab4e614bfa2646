//! The parser proper: turns the tokens of one complete message into a value,
//! with the exact error precedence and messages of QEMU's `json-parser.c`.
//!
//! The framer hands over the message's tokens as text (tokens separated by
//! at most a space), already lexically valid. The parser is iterative: its
//! stack lives on the heap, so depth never touches the machine stack.

use serde_json::{Map, Number, Value};

use super::utf8::{has_noncharacter, is_valid_codepoint, mod_utf8_codepoint};
use super::{ParseError, ParseErrorKind};

/// QEMU formats parser errors into a 1024-byte buffer: at most 1023 bytes
/// of message follow "JSON parse error, ".
const MESSAGE_CAP: usize = 1023;

/// Truncates a message like QEMU's `vsnprintf` into `char message[1024]`.
pub(crate) fn cap_message(mut msg: String) -> String {
    if msg.len() > MESSAGE_CAP {
        let mut end = MESSAGE_CAP;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    msg
}

fn syntax(msg: impl Into<String>) -> ParseError {
    ParseError::new(
        ParseErrorKind::Syntax,
        format!("JSON parse error, {}", cap_message(msg.into())),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// End of the message.
    End,
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    /// Byte range of a string token, quotes included.
    Str(usize, usize),
    /// Byte range of a number; `true` if it is an integer.
    Num(usize, usize, bool),
    /// Byte range of a keyword.
    Keyword(usize, usize),
    /// Anything else (cannot come from the framer).
    Bad,
}

struct Tokens<'a> {
    s: &'a [u8],
    pos: usize,
    peeked: Tok,
    has_peeked: bool,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a [u8]) -> Self {
        Tokens {
            s,
            pos: 0,
            peeked: Tok::End,
            has_peeked: false,
        }
    }

    #[inline]
    fn peek(&mut self) -> Tok {
        if !self.has_peeked {
            self.peeked = self.lex();
            self.has_peeked = true;
        }
        self.peeked
    }

    #[inline]
    fn next(&mut self) -> Tok {
        if self.has_peeked {
            self.has_peeked = false;
            self.peeked
        } else {
            self.lex()
        }
    }

    fn lex(&mut self) -> Tok {
        let s = self.s;
        while self.pos < s.len() && matches!(s[self.pos], b' ' | b'\t' | b'\r' | b'\n') {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(&b) = s.get(start) else {
            return Tok::End;
        };
        self.pos += 1;
        match b {
            b'{' => Tok::LCurly,
            b'}' => Tok::RCurly,
            b'[' => Tok::LSquare,
            b']' => Tok::RSquare,
            b':' => Tok::Colon,
            b',' => Tok::Comma,
            b'"' | b'\'' => {
                // Find the closing quote; an escape covers the next byte.
                let mut i = start + 1;
                loop {
                    match find_quote_or_backslash(&s[i..], b) {
                        Some(off) => {
                            i += off;
                            if s[i] == b'\\' {
                                i += 2;
                            } else {
                                break;
                            }
                        }
                        None => {
                            self.pos = s.len();
                            return Tok::Bad;
                        }
                    }
                    if i >= s.len() {
                        self.pos = s.len();
                        return Tok::Bad;
                    }
                }
                self.pos = i + 1;
                Tok::Str(start, i + 1)
            }
            b'-' | b'0'..=b'9' => {
                let mut int = true;
                while self.pos < s.len() {
                    match s[self.pos] {
                        b'0'..=b'9' | b'-' | b'+' => {}
                        b'.' | b'e' | b'E' => int = false,
                        _ => break,
                    }
                    self.pos += 1;
                }
                Tok::Num(start, self.pos, int)
            }
            b'a'..=b'z' => {
                while self.pos < s.len() && s[self.pos].is_ascii_lowercase() {
                    self.pos += 1;
                }
                Tok::Keyword(start, self.pos)
            }
            _ => Tok::Bad,
        }
    }
}

/// Position of the first `quote` or backslash in `s`.
#[inline]
fn find_quote_or_backslash(s: &[u8], quote: u8) -> Option<usize> {
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
        let hit = (a.wrapping_sub(LO) & !a & HI) | (c.wrapping_sub(LO) & !c & HI);
        if hit != 0 {
            break;
        }
        i += 8;
    }
    s[i..]
        .iter()
        .position(|&c| c == quote || c == b'\\')
        .map(|p| p + i)
}

enum Frame {
    Array(Vec<Value>),
    /// An object, and the key whose value is being parsed (`None` while the
    /// key itself is being parsed).
    Object(Map<String, Value>, Option<String>),
}

/// Parses the tokens of one message.
pub(crate) fn parse_tokens(s: &[u8]) -> Result<Value, ParseError> {
    let mut toks = Tokens::new(s);
    let mut stack: Vec<Frame> = Vec::new();
    'value: loop {
        // Parse one value (QEMU's parse_value).
        let mut value = match toks.peek() {
            Tok::End => return Err(syntax("premature EOI")),
            Tok::LCurly => {
                toks.next();
                match toks.peek() {
                    Tok::End => return Err(syntax("premature EOI")),
                    Tok::RCurly => {
                        toks.next();
                        Value::Object(Map::new())
                    }
                    _ => {
                        stack.push(Frame::Object(Map::new(), None));
                        continue 'value;
                    }
                }
            }
            Tok::LSquare => {
                toks.next();
                match toks.peek() {
                    Tok::End => return Err(syntax("premature EOI")),
                    Tok::RSquare => {
                        toks.next();
                        Value::Array(Vec::new())
                    }
                    _ => {
                        stack.push(Frame::Array(Vec::new()));
                        continue 'value;
                    }
                }
            }
            Tok::Str(a, b) => {
                toks.next();
                Value::String(parse_string(&s[a..b])?)
            }
            Tok::Num(a, b, int) => {
                toks.next();
                Value::Number(parse_number(&s[a..b], int)?)
            }
            Tok::Keyword(a, b) => {
                toks.next();
                match &s[a..b] {
                    b"true" => Value::Bool(true),
                    b"false" => Value::Bool(false),
                    b"null" => Value::Null,
                    kw => {
                        return Err(syntax(format!(
                            "invalid keyword '{}'",
                            String::from_utf8_lossy(kw)
                        )))
                    }
                }
            }
            _ => return Err(syntax("expecting value")),
        };
        // Hand the finished value to the enclosing containers.
        loop {
            match stack.last_mut() {
                None => return Ok(value),
                Some(Frame::Array(items)) => {
                    items.push(value);
                    match toks.next() {
                        Tok::End => return Err(syntax("premature EOI")),
                        Tok::RSquare => {
                            let Some(Frame::Array(items)) = stack.pop() else {
                                unreachable_frame();
                                return Err(syntax("expecting value"));
                            };
                            value = Value::Array(items);
                        }
                        Tok::Comma => continue 'value,
                        _ => return Err(syntax("expected separator in list")),
                    }
                }
                Some(Frame::Object(map, key)) => match key.take() {
                    None => {
                        let Value::String(k) = value else {
                            return Err(syntax("key is not a string in object"));
                        };
                        match toks.next() {
                            Tok::End => return Err(syntax("premature EOI")),
                            Tok::Colon => {}
                            _ => return Err(syntax("missing : in object pair")),
                        }
                        *key = Some(k);
                        continue 'value;
                    }
                    Some(k) => {
                        match map.entry(k) {
                            serde_json::map::Entry::Vacant(slot) => {
                                slot.insert(value);
                            }
                            serde_json::map::Entry::Occupied(_) => {
                                return Err(syntax("duplicate key"));
                            }
                        }
                        match toks.next() {
                            Tok::End => return Err(syntax("premature EOI")),
                            Tok::RCurly => {
                                let Some(Frame::Object(map, _)) = stack.pop() else {
                                    unreachable_frame();
                                    return Err(syntax("expecting value"));
                                };
                                value = Value::Object(map);
                            }
                            Tok::Comma => {
                                if toks.peek() == Tok::End {
                                    return Err(syntax("premature EOI"));
                                }
                                continue 'value;
                            }
                            _ => return Err(syntax("expected separator in dict")),
                        }
                    }
                },
            }
        }
    }
}

#[cold]
fn unreachable_frame() {
    debug_assert!(false, "parser stack out of sync");
}

fn parse_number(tok: &[u8], int: bool) -> Result<Number, ParseError> {
    // The framer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let text = std::str::from_utf8(tok).map_err(|_| syntax("expecting value"))?;
    if int {
        if let Ok(v) = text.parse::<i64>() {
            return Ok(Number::from(v));
        }
        if !text.starts_with('-') {
            if let Ok(v) = text.parse::<u64>() {
                return Ok(Number::from(v));
            }
        }
    }
    let v: f64 = text.parse().map_err(|_| syntax("expecting value"))?;
    Number::from_f64(v).ok_or_else(|| {
        // QEMU would carry an infinity along and later print invalid JSON;
        // serde_json cannot represent it, so this one is refused.
        syntax(format!("number {text} is out of range"))
    })
}

fn hex4(s: &[u8]) -> Option<u32> {
    let mut cp = 0u32;
    for i in 0..4 {
        let d = char::from(*s.get(i)?).to_digit(16)?;
        cp = (cp << 4) | d;
    }
    Some(cp)
}

/// Decodes a string token (quotes included) like QEMU's `parse_string`.
pub(crate) fn parse_string(tok: &[u8]) -> Result<String, ParseError> {
    let quote = tok[0];
    // Without the closing quote; QEMU's token is NUL-terminated after it,
    // which the slicing below models with `get`.
    let end = tok.len() - 1;
    let mut out = String::with_capacity(end.saturating_sub(1));
    let mut p = 1;
    while p < end {
        let run_end = match find_quote_or_backslash(&tok[p..end], quote) {
            Some(off) => p + off,
            None => end,
        };
        if run_end > p {
            push_run(&mut out, &tok[p..run_end])?;
            p = run_end;
            continue;
        }
        // tok[p] is a backslash (a quote cannot occur unescaped before `end`).
        let beg = p;
        p += 1;
        let Some(&esc) = tok.get(p) else {
            return Err(syntax("invalid escape sequence in string"));
        };
        p += 1;
        match esc {
            b'"' => out.push('"'),
            b'\'' => out.push('\''),
            b'\\' => out.push('\\'),
            b'/' => out.push('/'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let mut cp = hex4(&tok[p.min(tok.len())..]);
                p += 4;
                if let Some(lead) = cp {
                    if (0xD800..=0xDBFF).contains(&lead)
                        && tok.get(p) == Some(&b'\\')
                        && tok.get(p + 1) == Some(&b'u')
                    {
                        let trail = hex4(&tok[(p + 2).min(tok.len())..]);
                        match trail {
                            Some(t) if (0xDC00..=0xDFFF).contains(&t) => {
                                cp = Some(0x10000 + ((lead & 0x3FF) << 10) + (t & 0x3FF));
                                p += 6;
                            }
                            _ => cp = None,
                        }
                    }
                }
                match cp
                    .filter(|&c| is_valid_codepoint(c))
                    .and_then(char::from_u32)
                {
                    Some(c) => out.push(c),
                    None => {
                        // "%.*s": the escape text, cut at the token's end.
                        let shown = &tok[beg..p.min(tok.len())];
                        return Err(syntax(format!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(shown)
                        )));
                    }
                }
            }
            _ => return Err(syntax("invalid escape sequence in string")),
        }
    }
    Ok(out)
}

/// Appends a run of raw string bytes, validating them as modified UTF-8.
fn push_run(out: &mut String, run: &[u8]) -> Result<(), ParseError> {
    if let Ok(s) = std::str::from_utf8(run) {
        if s.is_ascii() || !has_noncharacter(s) {
            out.push_str(s);
            return Ok(());
        }
    }
    // Slow path: exact QEMU semantics (C0 80 is NUL, noncharacters refused).
    let mut i = 0;
    while i < run.len() {
        let (cp, used) = mod_utf8_codepoint(&run[i..]);
        match cp.and_then(char::from_u32) {
            Some(c) => out.push(c),
            None => return Err(syntax("invalid UTF-8 sequence in string")),
        }
        i += used.max(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Result<Value, String> {
        parse_tokens(s.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn values() {
        assert_eq!(
            p("{ \"a\" : [ 1 , 2.5 , true , false , null ] }").unwrap(),
            json!({"a": [1, 2.5, true, false, null]})
        );
        assert_eq!(p("'it\\'s'").unwrap(), json!("it's"));
        assert_eq!(p("\"\\u00e9\\ud83d\\ude00\"").unwrap(), json!("é😀"));
        assert_eq!(
            p("18446744073709551615").unwrap(),
            json!(18446744073709551615u64)
        );
        assert_eq!(
            p("-9223372036854775809").unwrap(),
            json!(-9223372036854775809f64)
        );
        assert_eq!(p("-0").unwrap(), json!(0));
        assert_eq!(p("[ ]").unwrap(), json!([]));
    }

    #[test]
    fn errors_match_qemu() {
        let cases = [
            ("{ \"a\" 1 }", "JSON parse error, missing : in object pair"),
            (
                "{ \"a\" : 1 \"b\" : 2 }",
                "JSON parse error, expected separator in dict",
            ),
            ("[ 1 2 ]", "JSON parse error, expected separator in list"),
            (
                "{ 1 : 2 }",
                "JSON parse error, key is not a string in object",
            ),
            ("{ \"a\" : }", "JSON parse error, expecting value"),
            ("[ 1 , ]", "JSON parse error, expecting value"),
            (
                "{ \"a\" : 1 , \"a\" : 2 }",
                "JSON parse error, duplicate key",
            ),
            (
                "{ \"a\" : 1 , \"a\" : [ 1 2 ] }",
                "JSON parse error, expected separator in list",
            ),
            ("nul", "JSON parse error, invalid keyword 'nul'"),
            (
                "\"\\x\"",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                "\"\\u12G4\"",
                "JSON parse error, \\u12G4 is not a valid Unicode character",
            ),
            (
                "\"\\u1\"",
                "JSON parse error, \\u1\" is not a valid Unicode character",
            ),
            (
                "\"\\uD800\\u0041\"",
                "JSON parse error, \\uD800 is not a valid Unicode character",
            ),
            (
                "\"\\uDBFF\\uDFFF\"",
                "JSON parse error, \\uDBFF\\uDFFF is not a valid Unicode character",
            ),
            (
                "\"\\uFFFF\"",
                "JSON parse error, \\uFFFF is not a valid Unicode character",
            ),
            ("[ 1 , 2", "JSON parse error, premature EOI"),
            ("1e400", "JSON parse error, number 1e400 is out of range"),
        ];
        for (input, msg) in cases {
            assert_eq!(p(input).unwrap_err(), msg, "{input}");
        }
        assert_eq!(
            parse_tokens(b"\"\xef\xbf\xbf\"").unwrap_err().to_string(),
            "JSON parse error, invalid UTF-8 sequence in string"
        );
        assert_eq!(parse_tokens(b"\"\xc0\x80\"").unwrap(), json!("\0"));
    }

    #[test]
    fn long_keyword_is_capped() {
        let kw = "a".repeat(5000);
        let e = p(&kw).unwrap_err();
        assert_eq!(e.len(), "JSON parse error, ".len() + MESSAGE_CAP);
    }
}
