use super::*;
use serde_json::json;

fn run(input: &[u8]) -> Vec<Result<Value, String>> {
    let mut f = Framer::new();
    f.feed(input)
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

fn errs(input: &[u8]) -> Vec<String> {
    run(input)
        .into_iter()
        .map(|r| match r {
            Ok(v) => format!("value {v}"),
            Err(e) => e,
        })
        .collect()
}

#[test]
fn splits_messages() {
    let out = run(b"{\"a\":1}{\"b\":2}\n[3] 4 ");
    assert_eq!(
        out,
        vec![
            Ok(json!({"a":1})),
            Ok(json!({"b":2})),
            Ok(json!([3])),
            Ok(json!(4))
        ]
    );
}

#[test]
fn number_waits_for_terminator() {
    let mut f = Framer::new();
    assert!(f.feed(b"12").is_empty());
    assert!(f.feed(b"3").is_empty());
    let out = f.feed(b"\n");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].as_ref().unwrap(), &json!(123));
    assert!(f.feed(b"true").is_empty());
    assert_eq!(f.finish()[0].as_ref().unwrap(), &json!(true));
}

#[test]
fn byte_by_byte_equals_whole() {
    let input = br#"{"execute": "x", "arguments": {"s": 'it\'s "q"', "n": [1, -2.5e3, 0, -0, 1E+2], "u": "\u00e9\ud83d\ude00"}, "id": null}"#;
    let whole = run(input);
    let mut f = Framer::new();
    let mut pieces = Vec::new();
    for b in input.iter() {
        pieces.extend(f.feed(std::slice::from_ref(b)));
    }
    let pieces: Vec<_> = pieces
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect();
    assert_eq!(whole, pieces);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].as_ref().unwrap()["arguments"]["s"], "it's \"q\"");
    assert_eq!(whole[0].as_ref().unwrap()["arguments"]["u"], "é😀");
}

#[test]
fn lexical_errors_like_qemu() {
    // Expected strings are QEMU 7.2's replies to the same input.
    assert_eq!(errs(b"\"a\tb\""), ["JSON parse error, stray '\"a\t'"]);
    assert_eq!(
        errs(b"\"a\x01b\"\n"),
        ["JSON parse error, stray '\"a\u{1}'"]
    );
    assert_eq!(
        errs(b"\"a\xfeb\"\n"),
        ["JSON parse error, stray '\"a\u{FFFD}'"]
    );
    assert_eq!(errs(b"\xff"), ["JSON parse error, stray '\u{FFFD}'"]);
    assert_eq!(errs(b"01"), ["JSON parse error, stray '01'"]);
    assert_eq!(errs(b"-\n"), ["JSON parse error, stray '-\n'"]);
    assert_eq!(errs(b"-x"), ["JSON parse error, stray '-x'"]);
    assert_eq!(errs(b"1.\n"), ["JSON parse error, stray '1.\n'"]);
    assert_eq!(errs(b"1.e5 "), ["JSON parse error, stray '1.e'"]);
    assert_eq!(errs(b"1e "), ["JSON parse error, stray '1e '"]);
    assert_eq!(errs(b"1e+ "), ["JSON parse error, stray '1e+ '"]);
    assert_eq!(errs(b"%d"), ["JSON parse error, stray '%'"]);
    assert_eq!(errs(b"TRUE"), ["JSON parse error, stray 'T'"]);
    assert_eq!(errs(b"abc "), ["JSON parse error, invalid keyword 'abc'"]);
}

#[test]
fn recovery_like_qemu() {
    // The stray byte drops input up to the '{' that starts the next message.
    let out = errs(b"@{\"execute\":\"x\",\"id\":3}");
    assert_eq!(
        out,
        [
            "JSON parse error, stray '@'".to_string(),
            "value {\"execute\":\"x\",\"id\":3}".to_string()
        ]
    );
    // 0xFE resets the same way.
    assert_eq!(errs(b"\xfe[1]").len(), 2);
    // An error mid-message drops what came before; the closing brace then
    // stands alone (QEMU answers it with "expecting value").
    assert_eq!(
        errs(b"{\"a\": @}"),
        [
            "JSON parse error, stray '@'",
            "JSON parse error, expecting value"
        ]
    );
    // Recovery skips everything but structural and control characters.
    assert_eq!(
        errs(b"@ junk 'x' \n 5 "),
        ["JSON parse error, stray '@'", "value 5"]
    );
}

#[test]
fn unbalanced_brackets_like_qemu() {
    assert_eq!(errs(b"}"), ["JSON parse error, expecting value"]);
    assert_eq!(errs(b"{]"), ["JSON parse error, expecting value"]);
    assert_eq!(
        errs(b"[}]"),
        [
            "JSON parse error, expecting value",
            "JSON parse error, expecting value"
        ]
    );
    assert_eq!(
        errs(b"{\"a\": 1} junk {\"b\": 2}\n"),
        [
            "value {\"a\":1}",
            "JSON parse error, invalid keyword 'junk'",
            "value {\"b\":2}"
        ]
    );
}

#[test]
fn nesting_limit_reports_once_and_skips_the_message() {
    let mut input = vec![b'['; 100_000];
    input.extend(std::iter::repeat_n(b']', 100_000));
    input.extend_from_slice(b"\n{\"execute\":\"ok\"}");
    let out = errs(&input);
    assert_eq!(
        out,
        [
            "JSON nesting depth limit exceeded",
            "value {\"execute\":\"ok\"}"
        ]
    );
    // Exactly at the limit is fine.
    let mut ok = vec![b'['; 1024];
    ok.extend(std::iter::repeat_n(b']', 1024));
    let out = run(&ok);
    assert_eq!(out.len(), 1);
    assert!(out[0].is_ok());
}

#[test]
fn unclosed_nesting_is_reset_by_control_character() {
    let mut f = Framer::new();
    let mut input = vec![b'['; 5000];
    input.push(b'\n');
    let out = f.feed(&input);
    assert_eq!(out.len(), 1);
    assert!(f.feed(b"{\"execute\":\"x\"}").is_empty());
    // A control character forces a lexical error and a clean state.
    let out = f.feed(b"\x01{\"execute\":\"x\"}");
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].as_ref().unwrap_err().kind(), ParseErrorKind::Lexical);
    assert_eq!(out[1].as_ref().unwrap(), &json!({"execute": "x"}));
}

fn small() -> Limits {
    Limits {
        max_token_size: 100,
        max_message_size: 200,
        max_token_count: 50,
        max_nesting: 8,
    }
}

#[test]
fn token_size_limit_skips_rest_of_message() {
    let mut f = Framer::with_limits(small());
    let mut input = b"{\"execute\":\"x\",\"arguments\":{\"s\":\"".to_vec();
    input.extend(std::iter::repeat_n(b'a', 10_000));
    input.extend_from_slice(b"[{\\\"}\"}}\n{\"execute\":\"y\"}");
    let mut out = Vec::new();
    for chunk in input.chunks(7) {
        out.extend(f.feed(chunk));
        assert!(f.buffered_bytes() <= 200 + 50 + STRAY_KEEP);
    }
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(
        out[0].as_ref().unwrap_err().kind(),
        ParseErrorKind::TokenSize
    );
    assert_eq!(
        out[0].as_ref().unwrap_err().to_string(),
        "JSON token size limit exceeded"
    );
    assert_eq!(out[1].as_ref().unwrap(), &json!({"execute": "y"}));
}

#[test]
fn message_size_and_count_limits() {
    let mut f = Framer::with_limits(small());
    // Many medium strings add up past the message limit.
    let s = format!("[{}]\n[1]", ["\"aaaaaaaaaaaaaaaaaaaa\""; 12].join(","));
    let out = f.feed(s.as_bytes());
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].as_ref().unwrap_err().kind(),
        ParseErrorKind::TokenSize
    );
    assert_eq!(out[1].as_ref().unwrap(), &json!([1]));
    // Too many tokens.
    let s = format!("[{}]\n[2]", ["1"; 40].join(","));
    let out = f.feed(s.as_bytes());
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].as_ref().unwrap_err().to_string(),
        "JSON token count limit exceeded"
    );
    assert_eq!(out[1].as_ref().unwrap(), &json!([2]));
}

#[test]
fn huge_top_level_keyword_is_skipped() {
    let mut f = Framer::with_limits(small());
    let mut input = vec![b'a'; 1000];
    input.extend_from_slice(b" [3]");
    let out = f.feed(&input);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].as_ref().unwrap_err().kind(),
        ParseErrorKind::TokenSize
    );
    assert_eq!(out[1].as_ref().unwrap(), &json!([3]));
}

#[test]
fn control_char_while_skipping_is_reported() {
    let mut f = Framer::with_limits(small());
    let mut input = b"[\"".to_vec();
    input.extend(std::iter::repeat_n(b'b', 500));
    input.extend_from_slice(b"\n[4]");
    let out = f.feed(&input);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(
        out[0].as_ref().unwrap_err().kind(),
        ParseErrorKind::TokenSize
    );
    let stray = out[1].as_ref().unwrap_err();
    assert_eq!(stray.kind(), ParseErrorKind::Lexical);
    assert!(stray
        .to_string()
        .starts_with("JSON parse error, stray '\"bbb"));
    assert!(stray.to_string().len() <= "JSON parse error, ".len() + 1023);
    assert_eq!(out[2].as_ref().unwrap(), &json!([4]));
}

#[test]
fn finish_reports_incomplete_input() {
    let mut f = Framer::new();
    assert!(f.feed(b"[1, {\"a\": 2").is_empty());
    let out = f.finish();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].as_ref().unwrap_err().to_string(),
        "JSON parse error, premature EOI"
    );
    assert!(f.is_idle());
}

#[test]
fn scan_string_finds_special_bytes() {
    for (i, special) in [b'"', b'\\', 0x00, 0x1f, 0xfe, 0xff]
        .into_iter()
        .enumerate()
    {
        for pos in 0..20 {
            let mut s = vec![b'a'; 20];
            s[pos] = special;
            assert_eq!(scan_string(&s, b'"'), pos, "case {i} pos {pos}");
        }
    }
    assert_eq!(scan_string(b"abc'def\"", b'\''), 3);
    assert_eq!(scan_string("é\u{7f} ~".as_bytes(), b'"'), 5);
    assert_eq!(scan_string(&[b'x'; 17], b'"'), 17);
}
