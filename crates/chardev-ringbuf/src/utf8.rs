//! Text conversions of `ringbuf-write` and `ringbuf-read` in `utf8` format,
//! reproducing QEMU 7.2.
//!
//! QEMU keeps strings in *modified UTF-8* (U+0000 as the two bytes
//! `C0 80`), so `ringbuf-write` of `"a\u0000b"` writes `61 C0 80 62`.
//! `ringbuf-read` returns the bytes read as a C string, and QEMU's JSON
//! output decodes it with `mod_utf8_codepoint()`: every invalid sequence
//! (stray continuation byte, truncated sequence, overlong form other than
//! `C0 80`, surrogate, noncharacter such as U+FFFF or U+FDD0, code point
//! beyond U+10FFFF, bytes `FE`/`FF`) becomes one U+FFFD, and a NUL byte ends
//! the string.
//!
//! Two read modes exist (see [`Utf8ReadMode`]): QEMU 7.2's exact behaviour,
//! and the behaviour QEMU's own documentation asks for, which is the
//! default: a read never splits a character it cannot return whole.

/// How `ringbuf-read` in `utf8` format treats what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Utf8ReadMode {
    /// A read never splits what it cannot return: a character cut by the
    /// size limit or by the end of the content stays in the ring for the
    /// next read (so a read may return fewer bytes than asked, even none);
    /// a NUL byte is returned as U+0000 instead of ending the reply; after
    /// the ring overwrote unread bytes, the continuation bytes (at most 3)
    /// of the character whose start was overwritten are dropped. Invalid
    /// sequences are replaced exactly as QEMU replaces them. This is the
    /// behaviour QEMU's schema documents for `ringbuf-read` (and its
    /// source's FIXME asks for).
    #[default]
    WholeCharacters,
    /// QEMU 7.2 byte for byte: exactly `min(size, count)` bytes are consumed,
    /// a character cut by the size limit becomes U+FFFD in this reply and its
    /// remaining bytes U+FFFD each in the next, and the reply ends at the
    /// first NUL byte (what follows it in this read is lost).
    Qemu72,
}

/// The bytes QEMU writes for a QMP string: its UTF-8 with U+0000 encoded
/// as `C0 80`.
pub fn encode_modified_utf8(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for part in s.split('\0').enumerate() {
        if part.0 > 0 {
            out.extend_from_slice(&[0xC0, 0x80]);
        }
        out.extend_from_slice(part.1.as_bytes());
    }
    out
}

/// One decoded sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    /// A code point (U+0000 only from `C0 80` or a raw NUL).
    Char(char),
    /// An invalid sequence, replaced by U+FFFD.
    Invalid,
    /// A valid prefix of a multi-byte sequence cut by the end of the input.
    Incomplete,
}

const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];

fn is_valid_codepoint(cp: u32) -> bool {
    !(cp > 0x10_FFFF
        || (0xFDD0..=0xFDEF).contains(&cp)
        || cp & 0xFFFE == 0xFFFE
        || (0xD800..=0xDFFF).contains(&cp))
}

/// QEMU's `mod_utf8_codepoint()` on `s[i..]`, where the end of `s` reads as
/// a NUL terminator. Returns the sequence and the index after it.
fn next_seq(s: &[u8], i: usize) -> (Seq, usize) {
    let byte = u32::from(s[i]);
    let mut p = i + 1;
    if byte < 0x80 {
        return (Seq::Char(char::from(s[i])), p);
    }
    if byte >= 0xFE || byte & 0x40 == 0 {
        return (Seq::Invalid, p);
    }
    let mut len = 0usize;
    let mut mask = 0x80u32;
    while byte & mask != 0 {
        len += 1;
        mask >>= 1;
    }
    let mut cp = byte & (mask - 1);
    for _ in 1..len {
        let Some(&b) = s.get(p) else {
            return (Seq::Incomplete, p);
        };
        if b & 0xC0 != 0x80 {
            return (Seq::Invalid, p);
        }
        p += 1;
        cp = (cp << 6) | u32::from(b & 0x3F);
    }
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    if overlong || !is_valid_codepoint(cp) {
        return (Seq::Invalid, p);
    }
    match char::from_u32(cp) {
        Some(c) => (Seq::Char(c), p),
        None => (Seq::Invalid, p),
    }
}

fn push(out: &mut String, seq: Seq) {
    match seq {
        Seq::Char(c) => out.push(c),
        Seq::Invalid | Seq::Incomplete => out.push('\u{FFFD}'),
    }
}

/// The string QEMU 7.2 replies for `bytes` read in `utf8` format: decoded up
/// to the first NUL byte, invalid sequences replaced by U+FFFD.
pub fn qemu72_reply(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let s = &bytes[..end];
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let (seq, next) = next_seq(s, i);
        push(&mut out, seq);
        i = next;
    }
    out
}

/// How many of `bytes` a [`Utf8ReadMode::WholeCharacters`] read consumes:
/// `skip` leading continuation bytes to drop (when `lost` is set), then
/// everything up to, not including, a trailing incomplete character.
/// Returns `(skip, take)`; the reply is [`whole_reply`] of
/// `bytes[skip..skip + take]`.
pub fn whole_split(bytes: &[u8], lost: bool) -> (usize, usize) {
    let mut skip = 0;
    if lost {
        while skip < bytes.len().min(3) && bytes[skip] & 0xC0 == 0x80 {
            skip += 1;
        }
    }
    let s = &bytes[skip..];
    let mut i = 0;
    while i < s.len() {
        let (seq, next) = next_seq(s, i);
        if seq == Seq::Incomplete {
            break;
        }
        i = next;
    }
    (skip, i)
}

/// The reply for bytes chosen by [`whole_split`]: every sequence decoded as
/// QEMU decodes it, NUL bytes kept as U+0000.
pub fn whole_reply(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let (seq, next) = next_seq(bytes, i);
        push(&mut out, seq);
        i = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: char = '\u{FFFD}';

    #[test]
    fn modified_utf8_encodes_nul() {
        assert_eq!(encode_modified_utf8("a\0b\u{e9}"), b"a\xC0\x80b\xC3\xA9");
        assert_eq!(encode_modified_utf8("\0\0"), b"\xC0\x80\xC0\x80");
        assert_eq!(encode_modified_utf8(""), b"");
    }

    // Every expectation below was observed on qemu-storage-daemon 7.2
    // (written with base64, read with utf8).
    #[test]
    fn qemu_replacements() {
        assert_eq!(qemu72_reply(b"\xC3"), R.to_string());
        assert_eq!(qemu72_reply(b"\xA9"), R.to_string());
        assert_eq!(qemu72_reply(b"\xC3\xA9\xE2"), format!("\u{e9}{R}"));
        assert_eq!(qemu72_reply(b"\x82\xAC\xF0\x9F"), format!("{R}{R}{R}"));
        assert_eq!(qemu72_reply(b"a\x00b"), "a");
        assert_eq!(qemu72_reply(b"\xC0\x80x"), "\0x");
        assert_eq!(
            qemu72_reply(
                b"\xef\xb7\x90|\xef\xbf\xbf|\xed\xa0\x80|\xf4\x90\x80\x80|\xf8\x88\x80\x80\x80|\xe2\x82x|\xff"
            ),
            format!("{R}|{R}|{R}|{R}|{R}|{R}x|{R}")
        );
    }

    #[test]
    fn overlong_forms() {
        assert_eq!(qemu72_reply(b"\xC1\xBF"), R.to_string()); // overlong '?'
        assert_eq!(qemu72_reply(b"\xE0\x80\xAF"), R.to_string());
        assert_eq!(qemu72_reply(b"\xF0\x8F\xBF\xBF"), R.to_string());
        assert_eq!(qemu72_reply(b"\xF0\x9F\x98\x80"), "\u{1F600}");
    }

    #[test]
    fn whole_holds_back_incomplete_tail() {
        assert_eq!(whole_split(b"\xC3", false), (0, 0));
        assert_eq!(whole_split(b"a\xC3", false), (0, 1));
        assert_eq!(whole_split(b"a\xE2\x82", false), (0, 1));
        assert_eq!(whole_split(b"a\xE2\x82\xAC", false), (0, 4));
        // Invalid, not incomplete: consumed.
        assert_eq!(whole_split(b"\xE2x", false), (0, 2));
        assert_eq!(whole_split(b"\xFF", false), (0, 1));
        assert_eq!(whole_split(b"\xA9", false), (0, 1));
    }

    #[test]
    fn whole_drops_fragment_after_loss() {
        assert_eq!(whole_split(b"\xA9abc", true), (1, 3));
        assert_eq!(whole_split(b"\x98\x80ab", true), (2, 2));
        assert_eq!(whole_split(b"\x80\x80\x80\x80a", true), (3, 2));
        assert_eq!(whole_split(b"\xA9abc", false), (0, 4));
    }

    #[test]
    fn whole_keeps_nul() {
        assert_eq!(whole_reply(b"a\0b"), "a\0b");
        assert_eq!(whole_reply(b"\xC0\x80"), "\0");
        assert_eq!(whole_reply(b"\xE2\0"), format!("{R}\0"));
    }

    #[test]
    fn reply_of_valid_text_is_identity() {
        let s = "plain ascii, caf\u{e9}, \u{20ac}, \u{1F600}";
        assert_eq!(qemu72_reply(s.as_bytes()), s);
        assert_eq!(whole_reply(s.as_bytes()), s);
        assert_eq!(whole_split(s.as_bytes(), false), (0, s.len()));
    }
}
