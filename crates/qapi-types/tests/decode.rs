//! Generated types against QEMU's behaviour: strict decoding with QEMU's
//! messages (checked against qemu-storage-daemon 7.2), lenient decoding for
//! clients, encoding round trips, unions, alternates and recursive types.

use proptest::prelude::*;
use qapi_types::{
    cmd, event, BlockdevDriver, BlockdevOptions, BlockdevOptionsBranch, BlockdevRef, QapiType,
};
use serde_json::{json, Value};

fn strict_err<T: QapiType + std::fmt::Debug>(v: Value) -> String {
    T::from_qmp_strict(v).unwrap_err().to_string()
}

#[test]
fn blockdev_add_errors_match_qemu() {
    // Each expected message is what qemu-storage-daemon 7.2 answers for the same arguments.
    let cases = [
        (
            json!({"driver": "file", "node-name": "f"}),
            "Parameter 'filename' is missing",
        ),
        (
            json!({"driver": "nope", "node-name": "f"}),
            "Parameter 'driver' does not accept value 'nope'",
        ),
        (
            json!({"driver": "raw", "node-name": "f", "file": 5}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            json!({"driver": "raw", "node-name": "f", "file": {"driver": "file"}}),
            "Parameter 'file.filename' is missing",
        ),
        (
            json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": [{"driver": "file"}]}),
            "Parameter 'children[0].filename' is missing",
        ),
        (
            json!({"driver": "file", "node-name": "q", "filename": "/x", "read-only": 1}),
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
        (
            json!({"driver": "file", "node-name": "q", "filename": "/x", "aio": 1}),
            "Invalid parameter type for 'aio', expected: string",
        ),
        (
            json!({"driver": "file", "node-name": "q", "filename": "/x", "aio": "bad"}),
            "Parameter 'aio' does not accept value 'bad'",
        ),
        (
            json!({"driver": "file", "filename": "/x", "bogus": true}),
            "Parameter 'bogus' is unexpected",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(strict_err::<BlockdevOptions>(args.clone()), want, "{args}");
    }
}

#[test]
fn unions_and_alternates_decode_and_round_trip() {
    let wire = json!({
        "driver": "qcow2",
        "node-name": "disk",
        "file": {"driver": "file", "filename": "/tmp/a.qcow2"},
        "backing": "base",
    });
    let opts = BlockdevOptions::from_qmp_strict(wire.clone()).unwrap();
    assert_eq!(opts.node_name.as_deref(), Some("disk"));
    assert_eq!(opts.driver.discriminant(), BlockdevDriver::Qcow2);
    let BlockdevOptionsBranch::Qcow2(q) = &opts.driver else {
        panic!("qcow2 branch expected: {opts:?}")
    };
    assert!(
        matches!(&q.file, BlockdevRef::Definition(d) if d.driver.discriminant() == BlockdevDriver::File)
    );
    assert_eq!(opts.to_qmp(), wire);
    // serde goes through the same encoding.
    assert_eq!(serde_json::to_value(&opts).unwrap(), wire);
    let back: BlockdevOptions = serde_json::from_value(wire).unwrap();
    assert_eq!(back, opts);
}

#[test]
fn lenient_decoding_tolerates_a_newer_server() {
    let v = json!({"driver": "future-driver", "node-name": "n", "new-member": 1});
    let opts = BlockdevOptions::from_qmp_lenient(v.clone()).unwrap();
    assert_eq!(
        opts.driver,
        BlockdevOptionsBranch::Unrecognized("future-driver".into())
    );
    assert!(BlockdevOptions::from_qmp_strict(v).is_err());
    let e = event::AnyEvent::decode(&qmp_proto::EventMessage::new(
        "FROM_THE_FUTURE",
        Some(json!({"x": 1})),
    ))
    .unwrap();
    assert_eq!(e.name(), "FROM_THE_FUTURE");
    assert!(matches!(e, event::AnyEvent::Unrecognized(_)));
    let stop = event::AnyEvent::decode(&event::Stop::message()).unwrap();
    assert!(matches!(stop, event::AnyEvent::Stop(_)));
}

#[test]
fn recursive_types_nest() {
    let info = json!({
        "filename": "top.qcow2", "format": "qcow2", "virtual-size": 1024, "dirty-flag": false,
        "backing-image": {"filename": "base.raw", "format": "raw", "virtual-size": 1024}
    });
    let parsed = qapi_types::ImageInfo::from_qmp_lenient(info.clone()).unwrap();
    assert_eq!(parsed.backing_image.as_ref().unwrap().filename, "base.raw");
    assert_eq!(parsed.to_qmp(), info);
}

#[test]
fn dispatcher_decodes_arguments_and_routes_groups() {
    struct Ctx {
        resized: Vec<(Option<String>, i64)>,
    }
    let mut d = qapi_types::Dispatcher::<Ctx>::new();
    d.register::<cmd::BlockResize>(|c, a| {
        c.resized.push((a.node_name, a.size));
        Ok(())
    });
    let mut ctx = Ctx {
        resized: Vec::new(),
    };
    let req = |args: Value| qmp_proto::Request {
        id: None,
        command: "block_resize".into(),
        arguments: args.as_object().unwrap().clone(),
        oob: false,
    };
    assert_eq!(
        d.dispatch(&mut ctx, &req(json!({"node-name": "n0", "size": 4096}))),
        Ok(json!({}))
    );
    assert_eq!(ctx.resized, vec![(Some("n0".into()), 4096)]);
    for (args, want) in [
        (
            json!({"node-name": "n0", "size": "x"}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (json!({"node-name": "n0"}), "Parameter 'size' is missing"),
        (
            json!({"node-name": "n0", "size": 1, "y": 2}),
            "Parameter 'y' is unexpected",
        ),
    ] {
        let err = d.dispatch(&mut ctx, &req(args)).unwrap_err();
        assert_eq!(err.class, qmp_proto::ErrorClass::GenericError);
        assert_eq!(err.desc, want);
    }
    let mut oob = req(json!({"size": 1}));
    oob.oob = true;
    assert_eq!(
        d.dispatch(&mut ctx, &oob).unwrap_err().desc,
        "The command block_resize does not support OOB"
    );
    // Only what is registered is listed, and the schema list follows.
    let names = d.commands();
    assert_eq!(
        names,
        [
            "block_resize",
            "qmp_capabilities",
            "query-commands",
            "query-qmp-schema"
        ]
    );
    let info = d.schema_info();
    let commands: Vec<&str> = info
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(commands.len(), 4, "{commands:?}");
    let all_names: std::collections::HashSet<&str> =
        info.iter().map(|e| e["name"].as_str().unwrap()).collect();
    for e in &info {
        for key in ["arg-type", "ret-type", "element-type"] {
            if let Some(r) = e.get(key) {
                assert!(all_names.contains(r.as_str().unwrap()), "{key} {r} of {e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary JSON never panics the strict or lenient decoders.
    #[test]
    fn arbitrary_json_never_panics(v in arb_json()) {
        let _ = BlockdevOptions::from_qmp_strict(v.clone());
        let _ = BlockdevOptions::from_qmp_lenient(v.clone());
        let _ = qapi_types::TransactionAction::from_qmp_strict(v.clone());
        let _ = qapi_types::ChardevBackend::from_qmp_strict(v);
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("file".to_owned()),
            Just("qcow2".to_owned()),
            Just("raw".to_owned()),
            Just("quorum".to_owned()),
            Just("ringbuf".to_owned()),
            "[a-z-]{0,8}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("driver".to_owned()),
                        Just("type".to_owned()),
                        Just("file".to_owned()),
                        Just("data".to_owned()),
                        Just("filename".to_owned()),
                        Just("children".to_owned()),
                        Just("node-name".to_owned()),
                        "[a-z-]{1,8}",
                    ],
                    inner
                ),
                0..6,
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}
