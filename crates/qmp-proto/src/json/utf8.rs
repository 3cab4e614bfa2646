//! QEMU's flavour of UTF-8 ("modified UTF-8", `util/unicode.c`).
//!
//! It is standard UTF-8 with two differences that matter on the wire:
//! the overlong two-byte sequence `C0 80` is accepted as U+0000, and the 66
//! Unicode noncharacters (U+FDD0..U+FDEF and U+xFFFE/U+xFFFF in every plane)
//! are rejected like surrogates.

/// Whether QEMU accepts `cp` as a character (in input and in output).
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false;
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false;
    }
    !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes the modified-UTF-8 sequence at the start of `s` (at most 6 bytes
/// are looked at, like QEMU's `mod_utf8_codepoint(s, 6, &end)`).
///
/// Returns the code point (or `None` when the sequence is invalid) and the
/// number of bytes the sequence spans, which is at least 1 for non-empty input.
pub(crate) fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    if first == 0 {
        return (None, 0);
    }
    if first < 0x80 {
        return (Some(u32::from(first)), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        // Impossible byte or unexpected continuation byte.
        return (None, 1);
    }
    let len = first.leading_ones() as usize; // 2..=6
    let mut cp = u32::from(first) & (0x7F >> len);
    let mut used = 1;
    for i in 1..len {
        let byte = if i < 6 {
            s.get(i).copied().unwrap_or(0)
        } else {
            0
        };
        if byte & 0xC0 != 0x80 {
            return (None, used);
        }
        used += 1;
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    if !is_valid_codepoint(cp) || (cp < MIN_CP[len - 2] && !(cp == 0 && len == 2)) {
        return (None, used);
    }
    (Some(cp), used)
}

/// Converts bytes to a `String` the way QEMU's JSON writer would show them:
/// every invalid sequence (in QEMU's sense) becomes U+FFFD.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0 {
            // QEMU's strings end at NUL.
            break;
        }
        if b < 0x80 {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (cp, used) = mod_utf8_codepoint(&bytes[i..]);
        let c = cp.and_then(char::from_u32).unwrap_or('\u{FFFD}');
        out.push(c);
        i += used.max(1);
    }
    out
}

/// Whether a valid Rust string contains a noncharacter (which QEMU rejects).
pub(crate) fn has_noncharacter(s: &str) -> bool {
    // Noncharacters are encoded with lead bytes EF (BMP) or F0..F4.
    if !s.bytes().any(|b| b == 0xEF || (0xF0..=0xF4).contains(&b)) {
        return false;
    }
    s.chars().any(|c| !is_valid_codepoint(u32::from(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_qemu() {
        assert_eq!(mod_utf8_codepoint(b"a"), (Some(0x61), 1));
        assert_eq!(mod_utf8_codepoint(b"\xc3\xa9"), (Some(0xE9), 2));
        assert_eq!(mod_utf8_codepoint(b"\xc0\x80"), (Some(0), 2));
        assert_eq!(mod_utf8_codepoint(b"\xe0\x80\x80"), (None, 3)); // overlong
        assert_eq!(mod_utf8_codepoint(b"\xed\xa0\x80"), (None, 3)); // surrogate
        assert_eq!(mod_utf8_codepoint(b"\xef\xbf\xbf"), (None, 3)); // U+FFFF
        assert_eq!(mod_utf8_codepoint(b"\xf4\x90\x80\x80"), (None, 4)); // > U+10FFFF
        assert_eq!(mod_utf8_codepoint(b"\xc3("), (None, 1));
        assert_eq!(mod_utf8_codepoint(b"\xff"), (None, 1));
        assert_eq!(mod_utf8_codepoint(b"\x80"), (None, 1));
        assert_eq!(mod_utf8_codepoint(b"\xf0\x9f\x98\x80"), (Some(0x1F600), 4));
        assert_eq!(mod_utf8_codepoint(b"\xfc\x80\x80\x80\x80\x80"), (None, 6));
    }

    #[test]
    fn lossy_replaces_whole_sequences() {
        assert_eq!(lossy(b"a\xe0\x80\x80b"), "a\u{FFFD}b");
        assert_eq!(lossy(b"\xff"), "\u{FFFD}");
        assert_eq!(lossy(b"x\0y"), "x");
        assert_eq!(lossy(b"\xc0\x80"), "\0");
    }

    #[test]
    fn noncharacters() {
        assert!(has_noncharacter("a\u{FFFF}"));
        assert!(has_noncharacter("\u{FDD0}"));
        assert!(has_noncharacter("\u{10FFFE}"));
        assert!(!has_noncharacter("\u{FFFD}\u{1F600}é"));
    }
}
