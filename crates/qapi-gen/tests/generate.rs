//! The generator on whole schemas: the workspace's own, a fixture with every
//! construct of the dialect, schemas it must refuse, and its binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use qapi_gen::schema::Schema;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn workspace_schema() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema/qapi-schema.json")
}

#[test]
fn generates_the_workspace_schema() {
    let code = qapi_gen::generate(&workspace_schema(), &qapi_gen::Config::default())
        .expect("the schema is valid");
    syn::parse_file(&code).expect("the generated code parses");
    for item in [
        "pub struct BlockdevOptions",
        "pub enum BlockdevOptionsBranch",
        "pub enum BlockdevRef",
        "pub trait BlockCoreCommands",
        "pub fn register_block_core_commands",
        "pub struct QueryVersion",
        "pub enum AnyEvent",
        "SCHEMA_INFO_JSON",
    ] {
        assert!(code.contains(item), "{item} missing");
    }
    let files = qapi_gen::schema_files(&workspace_schema()).unwrap();
    assert!(files.len() > 10 && files.iter().any(|f| f.ends_with("block-core.json")));
}

#[test]
fn generates_every_construct() {
    let path = fixture("all-kinds.json");
    let schema = Schema::load(&path).unwrap();
    let code = qapi_gen::generate_schema(&schema).unwrap();
    syn::parse_file(&code).expect("the generated code parses");
    for item in [
        "pub enum Color",
        "X8664",
        "V1st",
        "Unrecognized(::std::string::String)",
        "pub r#type: ::std::option::Option<::std::string::String>",
        // Node contains Red contains Node: boxed where the cycle closes.
        "::std::option::Option<::std::boxed::Box<crate::types::Node>>",
        // NodeRef is not on a cycle with Node: no box.
        "Inline(crate::types::Node)",
        "pub enum NodeBranch",
        "pub enum InlineBranch",
        "pub struct Sub",
        "crate::runtime::Null",
        "crate::runtime::QType",
        "pub struct MakeNode",
        "const ALLOW_OOB: bool = true",
        "pub struct PlainArguments",
        "type Args = crate::types::Base",
        "pub struct SomethingHappenedData",
        "pub struct BoxedEvent",
        "pub fn message() -> ::qmp_proto::EventMessage",
        "pub trait AllKindsCommands",
        "fn make_node(",
        "```text",
    ] {
        assert!(
            code.contains(item),
            "{item} missing from the generated code"
        );
    }
    // Doc prose is carried, references become code.
    assert!(code.contains("A recursive union through an alternate."));
    let info = qapi_gen::introspect::schema_info(&schema);
    assert!(info
        .iter()
        .any(|e| e["name"] == "make-node" && e["allow-oob"] == true));
    assert!(info
        .iter()
        .any(|e| e["name"] == "QUIET" && e["meta-type"] == "event"));
}

#[test]
fn refuses_schemas_whose_rust_names_collide() {
    let dir = tempfile_dir();
    for (text, why) in [
        ("{ 'enum': 'E', 'data': ['a-b', 'a_b'] }", "same Rust name"),
        ("{ 'enum': 'E', 'data': ['unrecognized'] }", "catch-all"),
        ("{ 'struct': 'foo-bar', 'data': {} }\n{ 'struct': 'FooBar', 'data': {} }", "both become"),
        ("{ 'enum': 'U', 'data': ['x'] }\n{ 'struct': 'X', 'data': {} }\n{ 'union': 'T', 'base': { 'k': 'U' }, 'discriminator': 'k', 'data': { 'x': 'X' } }\n{ 'enum': 'TBranch', 'data': [] }", "both become"),
    ] {
        let path = dir.join("bad.json");
        std::fs::write(&path, text).unwrap();
        let err = qapi_gen::generate(&path, &qapi_gen::Config::default()).unwrap_err().to_string();
        assert!(err.contains(why), "{text}: {err}");
    }
}

#[test]
fn if_conditions_follow_the_configuration() {
    let dir = tempfile_dir();
    let path = dir.join("cond.json");
    std::fs::write(
        &path,
        "{ 'enum': 'Accel', 'data': [ 'tcg', { 'name': 'kvm', 'if': 'CONFIG_KVM' } ] }\n\
         { 'command': 'query-kvm-only', 'if': 'CONFIG_KVM', 'returns': 'Accel' }\n\
         { 'command': 'query-all', 'data': { '*x': { 'type': 'int', 'if': { 'not': 'CONFIG_KVM' } } } }\n",
    )
    .unwrap();
    let off = qapi_gen::generate(&path, &qapi_gen::Config::default()).unwrap();
    assert!(!off.contains("QueryKvmOnly") && !off.contains("Kvm,"));
    assert!(off.contains("pub x:"));
    let on = qapi_gen::generate(&path, &qapi_gen::Config::from_list("CONFIG_KVM")).unwrap();
    assert!(on.contains("pub struct QueryKvmOnly") && on.contains("Kvm"));
    assert!(!on.contains("pub x:"));
    // Introspection follows the same configuration.
    let schema = Schema::load_with(&path, &qapi_gen::Config::default()).unwrap();
    let info = qapi_gen::introspect::schema_info(&schema);
    assert!(!info.iter().any(|e| e["name"] == "query-kvm-only"));
}

#[test]
fn follows_includes_once_and_reports_missing_ones() {
    let dir = tempfile_dir();
    std::fs::write(
        dir.join("a.json"),
        "{ 'include': 'b.json' }\n{ 'include': 'b.json' }\n{ 'command': 'x', 'returns': 'B' }",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.json"),
        "{ 'struct': 'B', 'data': { 'n': 'int' } }",
    )
    .unwrap();
    let schema = Schema::load(&dir.join("a.json")).unwrap();
    assert_eq!(schema.entities.len(), 2);
    assert_eq!(schema.get("B").unwrap().module, "b");
    std::fs::write(dir.join("c.json"), "{ 'include': 'missing.json' }").unwrap();
    assert!(Schema::load(&dir.join("c.json"))
        .unwrap_err()
        .to_string()
        .contains("missing.json"));
}

#[test]
fn the_binary_checks_and_writes() {
    let bin = env!("CARGO_BIN_EXE_qapi-gen");
    let dir = tempfile_dir();
    let out = dir.join("out.rs");
    let ok = Command::new(bin)
        .arg(fixture("all-kinds.json"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("pub enum Color"));
    let to_stdout = Command::new(bin)
        .arg(fixture("all-kinds.json"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&to_stdout.stdout).contains("@generated"));
    std::fs::write(
        dir.join("bad.json"),
        "{ 'struct': 'S', 'data': { 'a': 'Nope' } }",
    )
    .unwrap();
    let bad = Command::new(bin)
        .arg(dir.join("bad.json"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown type 'Nope'"));
    let usage = Command::new(bin).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(Command::new(bin).arg("--help").status().unwrap().success());
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qapi-gen-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
