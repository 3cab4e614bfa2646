use super::*;

fn version() -> Value {
    json!({"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"})
}

fn session() -> Session {
    let mut s = Session::new(SessionConfig::new(version()));
    let n = s.output_len();
    s.consume_output(n);
    s
}

/// Feeds `input`, answers every request with `{"ok": command}` (as the
/// caller would) and returns the output lines.
fn exchange(s: &mut Session, input: &[u8]) -> Vec<String> {
    s.feed(input);
    while let Some(req) = s.next_request() {
        s.respond(Ok(json!({"ok": req.command})));
    }
    let out = String::from_utf8(s.pending_output().to_vec()).unwrap();
    let n = s.output_len();
    s.consume_output(n);
    out.split_terminator("\r\n").map(str::to_owned).collect()
}

fn negotiated() -> Session {
    let mut s = session();
    assert_eq!(
        exchange(&mut s, b"{\"execute\":\"qmp_capabilities\"}"),
        [r#"{"return": {}}"#]
    );
    s
}

#[test]
fn greeting_matches_qemu() {
    let s = Session::new(SessionConfig::new(version()));
    assert_eq!(
        s.pending_output(),
        br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}
"#
        .iter()
        .copied()
        .filter(|&b| b != b'\n')
        .chain(*b"\r\n")
        .collect::<Vec<u8>>()
        .as_slice()
    );
    let mut cfg = SessionConfig::new(json!({}));
    cfg.offer_oob = false;
    assert_eq!(
        Session::new(cfg).pending_output(),
        b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n"
    );
}

/// Replies recorded from qemu-storage-daemon 7.2.22 for the same input,
/// before capabilities negotiation.
#[test]
fn negotiation_mode_errors_match_qemu() {
    let cases: &[(&[u8], &str)] = &[
        (b"[]", r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#),
        (b"{}", r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#),
        (b"{\"id\": 5}", r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#),
        (b"{\"execute\": 1, \"id\": 5}", r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#),
        (b"{\"execute\": \"x\", \"arguments\": []}", r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#),
        (b"{\"execute\": \"x\", \"foo\": 1}", r#"{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#),
        (b"{\"execute\": \"x\", \"exec-oob\": \"y\"}", r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#),
        (b"{\"exec-oob\": \"y\", \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#),
        (b"{\"execute\": \"query-version\", \"arguments\": {\"enable\": []}, \"id\": 1}", r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"foo\"]}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": \"oob\"}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": null}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [1]}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable[0]', expected: string"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"bogus\": 1}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}"#),
        (b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": \"oob\", \"bogus\": 1}, \"id\": 1}", r#"{"id": 1, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#),
        (b"{\"execute\": \"query-version\", \"id\": 1, \"id\": 2}", r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#),
    ];
    for (input, expected) in cases {
        let mut s = session();
        assert_eq!(
            exchange(&mut s, input),
            [*expected],
            "{}",
            String::from_utf8_lossy(input)
        );
        assert!(!s.is_negotiated());
    }
}

#[test]
fn capabilities_negotiation() {
    let mut s = session();
    assert_eq!(
        exchange(&mut s, b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\", \"oob\"]}, \"id\": 1}"),
        [r#"{"return": {}, "id": 1}"#]
    );
    assert!(s.is_negotiated());
    assert!(s.oob_enabled());
    // Recorded from QEMU 7.2 with oob enabled.
    assert_eq!(
        exchange(
            &mut s,
            b"{\"exec-oob\": \"qmp_capabilities\", \"id\": 3}{\"execute\": \"x\", \"exec-oob\": \"y\"}{\"exec-oob\": \"x\", \"execute\": \"y\"}{\"exec-oob\": 1}{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}, \"id\": 1}{\"execute\": \"qmp_capabilities\", \"arguments\": {\"bogus\": 1}, \"id\": 1}"
        ),
        [
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "The command qmp_capabilities does not support OOB"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#,
            r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}"#,
        ]
    );
    // exec-oob reaches the caller flagged as such.
    s.feed(b"{\"exec-oob\": \"migrate-pause\", \"id\": 2}");
    let req = s.next_request().unwrap();
    assert!(req.oob);
    assert_eq!(req.command, "migrate-pause");
}

#[test]
fn oob_not_offered_cannot_be_enabled() {
    let mut cfg = SessionConfig::new(json!({}));
    cfg.offer_oob = false;
    let mut s = Session::new(cfg);
    let n = s.output_len();
    s.consume_output(n);
    assert_eq!(
        exchange(
            &mut s,
            b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}"
        ),
        [r#"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"#]
    );
    assert!(!s.is_negotiated());
}

#[test]
fn command_mode_without_oob_rejects_exec_oob() {
    let mut s = negotiated();
    assert_eq!(
        exchange(&mut s, b"{\"exec-oob\": \"query-version\", \"id\": 2}"),
        [
            r#"{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
        ]
    );
    assert_eq!(
        exchange(
            &mut s,
            b"{\"execute\": \"query-version\", \"control\": {}, \"id\": null}"
        ),
        [
            r#"{"id": null, "error": {"class": "GenericError", "desc": "QMP input member 'control' is unexpected"}}"#
        ]
    );
}

#[test]
fn requests_reach_caller_with_any_id() {
    let mut s = negotiated();
    s.feed(b"{'execute': 'query-version', 'id': 'it\\'s', 'arguments': {'a': [1]}}{\"execute\":\"b\",\"id\":[1,{\"a\":2}]}");
    let r = s.next_request().unwrap();
    assert_eq!(r.command, "query-version");
    assert_eq!(r.id, Some(json!("it's")));
    assert_eq!(r.arguments, json!({"a": [1]}).as_object().unwrap().clone());
    assert!(!r.oob);
    // Nothing more until the reply.
    assert!(s.next_request().is_none());
    assert!(s.is_awaiting_reply());
    s.respond(Ok(json!({})));
    let r = s.next_request().unwrap();
    assert_eq!(r.id, Some(json!([1, {"a": 2}])));
    s.respond(Err(QmpError::command_not_found("b")));
    assert_eq!(
        String::from_utf8(s.pending_output().to_vec()).unwrap(),
        "{\"return\": {}, \"id\": \"it's\"}\r\n{\"id\": [1, {\"a\": 2}], \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command b has not been found\"}}\r\n"
    );
}

#[test]
fn parse_errors_keep_their_place_in_order() {
    let mut s = negotiated();
    s.feed(b"{\"execute\":\"a\",\"id\":1} junk {\"execute\":\"b\",\"id\":2}\n");
    let a = s.next_request().unwrap();
    // The parse error after `a` is not sent before `a`'s reply.
    assert_eq!(s.output_len(), 0);
    s.respond(Ok(json!(null)));
    let b = s.next_request().unwrap();
    assert_eq!((a.command.as_str(), b.command.as_str()), ("a", "b"));
    s.respond(Ok(json!(2)));
    assert_eq!(
        String::from_utf8(s.pending_output().to_vec()).unwrap(),
        "{\"return\": null, \"id\": 1}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'junk'\"}}\r\n{\"return\": 2, \"id\": 2}\r\n"
    );
}

#[test]
fn events_only_after_negotiation() {
    let mut s = session();
    let ev = EventMessage {
        event: "STOP".into(),
        data: None,
        timestamp: crate::Timestamp {
            seconds: 1795240882,
            microseconds: 501521,
        },
    };
    assert!(!s.push_event(&ev));
    assert_eq!(s.output_len(), 0);
    let mut s = negotiated();
    assert!(s.push_event(&ev));
    let ev2 = EventMessage {
        data: Some(json!({"status": "created", "id": "j"})),
        event: "JOB_STATUS_CHANGE".into(),
        ..ev
    };
    assert!(s.push_event(&ev2));
    assert_eq!(
        String::from_utf8(s.pending_output().to_vec()).unwrap(),
        "{\"timestamp\": {\"seconds\": 1795240882, \"microseconds\": 501521}, \"event\": \"STOP\"}\r\n{\"timestamp\": {\"seconds\": 1795240882, \"microseconds\": 501521}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"created\", \"id\": \"j\"}}\r\n"
    );
}

#[test]
fn backpressure_and_hard_limit() {
    let mut cfg = SessionConfig::new(json!({}));
    cfg.output_high_water = 200;
    cfg.output_hard_limit = 1000;
    let mut s = Session::new(cfg);
    s.feed(b"{\"execute\":\"qmp_capabilities\"}");
    // The greeting alone is under the mark.
    assert!(s.next_request().is_none());
    assert!(s.is_negotiated());
    // Many bad messages: processing stops once output passes the mark.
    s.feed(&b"[]".repeat(100));
    assert!(s.next_request().is_none());
    assert!(s.is_backpressured());
    assert!(s.buffered_input() > 0);
    let before = s.buffered_input();
    assert!(s.next_request().is_none());
    assert_eq!(s.buffered_input(), before);
    // The client reads: processing resumes.
    let n = s.output_len();
    s.consume_output(n);
    assert!(s.next_request().is_none());
    assert!(s.buffered_input() < before);
    // Events pile up for a client that never reads.
    let ev = EventMessage::new("X", Some(json!({"pad": "x".repeat(100)})));
    let mut queued = 0;
    while s.push_event(&ev) {
        queued += 1;
        assert!(queued < 100);
    }
    assert!(s.must_disconnect());
    assert!(s.output_len() <= 1000);
    assert!(!s.wants_input());
}

#[test]
fn request_span_covers_preceding_whitespace() {
    let mut s = negotiated();
    let first = b"{\"execute\":\"a\"}";
    s.feed(first);
    s.feed(b"  {\"execute\":\"b\"}");
    let base = b"{\"execute\":\"qmp_capabilities\"}".len() as u64;
    let _ = s.next_request().unwrap();
    assert_eq!(s.request_span(), Some(base..base + first.len() as u64));
    s.respond(Ok(json!({})));
    let _ = s.next_request().unwrap();
    let start = base + first.len() as u64;
    assert_eq!(s.request_span(), Some(start..start + 17));
}
