//! Property tests of the framer, the parser and the encoder.

use proptest::prelude::*;
use qmp_proto::encode::{to_string, write_message, KeyOrder};
use qmp_proto::framer::Framer;
use qmp_proto::json::{self, Limits};
use serde_json::{Map, Number, Value};

/// Characters QEMU accepts (noncharacters are refused on input and
/// replaced on output, so they cannot round-trip).
fn qemu_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range(' ', '~'),
        1 => proptest::char::range('\u{0}', '\u{1f}'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('\''),
        1 => any::<char>().prop_filter("noncharacter", |c| {
            let cp = u32::from(*c);
            !((0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE)
        }),
    ]
}

fn qemu_string() -> impl Strategy<Value = String> {
    proptest::collection::vec(qemu_char(), 0..12).prop_map(|v| v.into_iter().collect())
}

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Number::from_f64(f).unwrap_or_else(|| Number::from(0))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::Number),
        qemu_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((qemu_string(), inner), 0..6).prop_map(|kv| {
                let mut m = Map::new();
                for (k, v) in kv {
                    m.insert(k, v);
                }
                Value::Object(m)
            }),
        ]
    })
}

/// Equality up to QEMU's number representation: `%.17g` prints an
/// integral float as an integer.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                x.as_f64() == y.as_f64()
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn feed_split(input: &[u8], cuts: &[usize], limits: Limits) -> Vec<Result<Value, String>> {
    let mut f = Framer::with_limits(limits);
    let mut out = Vec::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(input.len())) {
        out.extend(f.feed(&input[prev..c]));
        prev = c;
    }
    out.extend(f.finish());
    out.into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

fn small_limits() -> Limits {
    Limits {
        max_token_size: 64,
        max_message_size: 256,
        max_token_count: 40,
        max_nesting: 6,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_then_parse_round_trips(v in value()) {
        let text = to_string(&v, KeyOrder::Qemu);
        prop_assert!(text.is_ascii());
        let back = json::parse(text.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert!(same(&v, &back), "{} vs {}", v, back);
        // Insertion order gives the same value.
        let back2 = json::parse(to_string(&v, KeyOrder::Insertion).as_bytes()).unwrap();
        prop_assert!(same(&v, &back2));
    }

    #[test]
    fn any_split_of_valid_input_gives_the_same_messages(
        vs in proptest::collection::vec(value(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut input = Vec::new();
        for v in &vs {
            write_message(&mut input, v, KeyOrder::Qemu);
        }
        let whole = feed_split(&input, &[], Limits::default());
        let split = feed_split(&input, &cuts, Limits::default());
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(whole.len(), vs.len());
        for (v, r) in vs.iter().zip(&whole) {
            let got = r.as_ref().map_err(|e| TestCaseError::fail(e.clone()))?;
            prop_assert!(same(v, got));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        chunks in proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    3 => any::<u8>(),
                    2 => proptest::sample::select(b"{}[]:,\"'\\ \n0123456789-+.eEaflnrstu\xff".to_vec()),
                ],
                0..200,
            ),
            0..20,
        ),
    ) {
        let limits = small_limits();
        let mut f = Framer::with_limits(limits);
        for c in &chunks {
            let _ = f.feed(c);
            prop_assert!(f.buffered_bytes() <= f.max_buffered_bytes());
        }
        let _ = f.finish();
        prop_assert!(f.is_idle());
    }

    #[test]
    fn any_split_of_any_bytes_gives_the_same_results(
        input in proptest::collection::vec(
            prop_oneof![
                1 => any::<u8>(),
                4 => proptest::sample::select(b"{}[]:,\"'\\ \n0123456789-.eEaflnrstu".to_vec()),
            ],
            0..300,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        small in any::<bool>(),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        prop_assert_eq!(feed_split(&input, &[], limits), feed_split(&input, &cuts, limits));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash(depth in 1025usize..5000, obj in any::<bool>()) {
        let (open, close): (&[u8], &[u8]) = if obj { (b"{\"a\":", b"}") } else { (b"[", b"]") };
        let mut input = open.repeat(depth);
        input.extend_from_slice(b"1");
        input.extend(close.repeat(depth));
        input.extend_from_slice(b" [7] ");
        let out = feed_split(&input, &[], Limits::default());
        prop_assert_eq!(out.len(), 2);
        prop_assert_eq!(out[0].clone(), Err("JSON nesting depth limit exceeded".to_string()));
        prop_assert_eq!(out[1].clone(), Ok(serde_json::json!([7])));
    }
}
