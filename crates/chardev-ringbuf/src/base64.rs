//! Base64 (RFC 4648, standard alphabet, with padding) for `ringbuf-write`
//! and `ringbuf-read` in `base64` format.
//!
//! Encoding is glib's `g_base64_encode()`, as QEMU uses. Decoding is strict,
//! as the schema documents: QEMU 7.2 rejects characters outside the
//! alphabet ("Base64 data contains invalid characters") but accepts
//! newlines, lengths that are not a multiple of 4 and `=` in the middle,
//! silently writing garbage or nothing. Here all of those are errors; only
//! non-zero unused bits in the last character are tolerated (as glib and
//! RFC 4648 section 3.5 allow).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why base64 data is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    /// A character outside `A-Z a-z 0-9 + / =`, whitespace included
    /// (QEMU's message).
    #[error("Base64 data contains invalid characters")]
    InvalidCharacters,
    /// The length is not a multiple of 4.
    #[error("Base64 data length is not a multiple of 4")]
    Length,
    /// `=` somewhere else than in the last one or two positions.
    #[error("Base64 data contains padding '=' before its end")]
    Padding,
}

/// Encodes `data` with padding.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// Decodes strictly (see the module documentation).
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let s = text.as_bytes();
    if s.iter().any(|&c| c != b'=' && value(c).is_none()) {
        return Err(Base64Error::InvalidCharacters);
    }
    if s.len() % 4 != 0 {
        return Err(Base64Error::Length);
    }
    let pad = s.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 || s[..s.len() - pad].contains(&b'=') {
        return Err(Base64Error::Padding);
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for quad in s.chunks(4) {
        let mut n = 0u32;
        let mut have = 0;
        for &c in quad {
            if let Some(v) = value(c) {
                n = (n << 6) | v;
                have += 1;
            }
        }
        n <<= 6 * (4 - have);
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..have - 1]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn binary_round_trip() {
        let all: Vec<u8> = (0..=255u8).collect();
        for n in 0..all.len() {
            assert_eq!(decode(&encode(&all[..n])).unwrap(), &all[..n]);
        }
    }

    #[test]
    fn rejects_what_the_seed_calls_invalid() {
        use Base64Error::*;
        assert_eq!(decode("Y Q=="), Err(InvalidCharacters));
        assert_eq!(decode("YQ==\n"), Err(InvalidCharacters));
        assert_eq!(decode("YW\nJj"), Err(InvalidCharacters));
        assert_eq!(decode("YWJj\r\n"), Err(InvalidCharacters));
        assert_eq!(decode("\tYWJj"), Err(InvalidCharacters));
        assert_eq!(decode("!!!!"), Err(InvalidCharacters));
        assert_eq!(decode("YWJ\u{e9}"), Err(InvalidCharacters));
        assert_eq!(decode("YWJj-_"), Err(InvalidCharacters));
        assert_eq!(decode("YQ="), Err(Length));
        assert_eq!(decode("Y"), Err(Length));
        assert_eq!(decode("=YQ="), Err(Padding));
        assert_eq!(decode("Y=Q="), Err(Padding));
        assert_eq!(decode("YQ==YQ=="), Err(Padding));
        assert_eq!(decode("Y==="), Err(Padding));
        assert_eq!(decode("===="), Err(Padding));
    }

    #[test]
    fn tolerates_unused_bits_like_glib() {
        assert_eq!(decode("YR==").unwrap(), b"a");
        assert_eq!(decode("YWJ=").unwrap(), b"ab");
    }
}
