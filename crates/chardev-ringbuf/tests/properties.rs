//! Properties: reading in pieces never changes the text (whole-character
//! mode), base64 round-trips and never panics, the ring's accounting holds.

use chardev_ringbuf::{base64, parse_chardev_opts, ChardevRegistry, DataFormat, RingBuf};
use proptest::prelude::*;

fn ring_registry(size: usize) -> ChardevRegistry {
    let mut reg = ChardevRegistry::new();
    let p = parse_chardev_opts(&format!("ringbuf,id=r,size={size}")).unwrap();
    reg.add(&p.id, &p.config).unwrap();
    reg
}

proptest! {
    /// However the reads are sized, the concatenated replies are the text
    /// of the whole content read at once: no character is ever split.
    #[test]
    fn piecewise_reads_equal_one_read(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        sizes in proptest::collection::vec(1i64..9, 1..200),
    ) {
        let reg = ring_registry(512);
        reg.ringbuf_write("r", &bytes).unwrap();
        let mut pieces = String::new();
        for s in sizes {
            pieces.push_str(&reg.ringbuf_read("r", s, DataFormat::Utf8).unwrap());
        }
        // Whatever is left (at most a held-back character, or unread input).
        let rest = reg.ringbuf_read("r", 1 << 20, DataFormat::Utf8).unwrap();
        pieces.push_str(&rest);
        let all = ring_registry(512);
        all.ringbuf_write("r", &bytes).unwrap();
        let at_once = all.ringbuf_read("r", 1 << 20, DataFormat::Utf8).unwrap();
        prop_assert_eq!(pieces, at_once);
    }

    /// Valid text (no NUL) comes back unchanged in both modes.
    #[test]
    fn valid_text_round_trips(s in "[^\u{0}\u{FDD0}-\u{FDEF}\u{FFFE}\u{FFFF}]{0,100}") {
        for mode in [chardev_ringbuf::Utf8ReadMode::WholeCharacters, chardev_ringbuf::Utf8ReadMode::Qemu72] {
            let mut reg = ring_registry(1024);
            reg.set_utf8_read_mode(mode);
            reg.ringbuf_write_str("r", &s, DataFormat::Utf8).unwrap();
            let back = reg.ringbuf_read("r", 1 << 20, DataFormat::Utf8).unwrap();
            // Noncharacters of other planes are replaced as QEMU does.
            let expect: String = s.chars().map(|c| {
                if (c as u32) & 0xFFFE == 0xFFFE { '\u{FFFD}' } else { c }
            }).collect();
            prop_assert_eq!(back, expect);
        }
    }

    #[test]
    fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(base64::decode(&base64::encode(&bytes)).unwrap(), bytes);
    }

    #[test]
    fn base64_decode_never_panics(s in "\\PC{0,40}") {
        let _ = base64::decode(&s);
    }

    /// Whatever is written and read, what was read plus what was
    /// overwritten plus what is held equals what was written.
    #[test]
    fn ring_accounting(ops in proptest::collection::vec((any::<bool>(), 0usize..40), 0..100)) {
        let ring = RingBuf::new(16).unwrap();
        let mut read = 0u64;
        let mut buf = [0u8; 40];
        for (write, n) in ops {
            if write {
                ring.write(&buf[..n]);
            } else {
                read += ring.read(&mut buf[..n]) as u64;
            }
            prop_assert!(ring.len() <= 16);
            prop_assert_eq!(read + ring.overwritten() + ring.len() as u64, ring.written());
        }
    }
}
