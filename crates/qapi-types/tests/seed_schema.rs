//! The schema against the seed documents: every command QEMU 2.7 documents
//! (schema/tests/seed-commands.txt) and every definition of QEMU 2.6's
//! block-core.json (schema/tests/seed-definitions.txt) is in the schema with
//! the documented members, and everything the schema defines is generated.

use std::collections::HashSet;
use std::path::PathBuf;

use qapi_gen::schema::{Kind, Member, MembersRef, Schema, TypeRef};

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schema")
}

fn schema() -> Schema {
    Schema::load(&schema_dir().join("qapi-schema.json")).expect("the schema is valid")
}

fn fixture(name: &str) -> Vec<Vec<String>> {
    let path = schema_dir().join("tests").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// Every member a command accepts: inline, a named struct, or a boxed
/// union's base and all of its branches.
fn accepted_members(s: &Schema, args: &Option<MembersRef>) -> Vec<Member> {
    match args {
        None => Vec::new(),
        Some(MembersRef::Named(n)) => match s.get(n).map(|e| &e.kind) {
            Some(Kind::Union { base, variants, .. }) => {
                let mut ms = s.members_of(base);
                for (_, t) in variants {
                    ms.extend(s.struct_members(t));
                }
                ms
            }
            _ => s.struct_members(n),
        },
        Some(r) => s.members_of(r),
    }
}

#[test]
fn every_seed_command_is_in_the_schema_with_its_arguments() {
    let s = schema();
    let lines = fixture("seed-commands.txt");
    assert!(
        lines.len() > 100,
        "the fixture lists the ~130 documented commands, found {}",
        lines.len()
    );
    let mut problems = Vec::new();
    for line in &lines {
        let name = &line[0];
        let Some(e) = s.get(name) else {
            problems.push(format!("{name}: not in the schema"));
            continue;
        };
        let Kind::Command { args, returns, .. } = &e.kind else {
            problems.push(format!("{name}: is a {}, not a command", e.meta()));
            continue;
        };
        let members = accepted_members(&s, args);
        let mut words = line[1..].iter();
        while let Some(w) = words.next() {
            if w == "->" {
                let want = words.next().expect("a type after ->");
                let got = returns.as_ref().map(TypeRef::element);
                if got != Some(want.trim_start_matches('[').trim_end_matches(']')) {
                    problems.push(format!("{name}: returns {got:?}, the seed says {want}"));
                }
                break;
            }
            let (arg, seed_optional) = match w.strip_prefix('*') {
                Some(a) => (a, true),
                None => (w.as_str(), false),
            };
            // The seed's blockdev-add wraps its arguments in `options`; the schema
            // has QEMU's stable flat form and the handler unwraps the old one.
            if name == "blockdev-add" && arg == "options" {
                continue;
            }
            match members.iter().find(|m| m.name == arg) {
                None => problems.push(format!("{name}: argument '{arg}' missing")),
                Some(m) if seed_optional && !m.optional => problems.push(format!(
                    "{name}: '{arg}' is optional in the seed but required here"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_seed_block_core_definition_is_in_the_schema() {
    let s = schema();
    let lines = fixture("seed-definitions.txt");
    assert!(
        lines.len() >= 90,
        "the fixture lists the 95 definitions of the seed block-core.json, found {}",
        lines.len()
    );
    let mut problems = Vec::new();
    for line in &lines {
        let (kind, name) = (&line[0], &line[1]);
        let Some(e) = s.get(name) else {
            problems.push(format!("{kind} {name}: not in the schema"));
            continue;
        };
        // Simple unions of 2.6 became flat unions, as in QEMU 7.
        if e.meta() != kind && !(kind == "union" && e.meta() == "union") {
            problems.push(format!("{name}: a {} here, a {kind} in the seed", e.meta()));
        }
        let have: HashSet<String> = match &e.kind {
            Kind::Enum { values, .. } => values.iter().map(|v| v.name.clone()).collect(),
            Kind::Struct { .. } => s.struct_members(name).into_iter().map(|m| m.name).collect(),
            Kind::Union { base, variants, .. } => s
                .members_of(base)
                .into_iter()
                .map(|m| m.name)
                .chain(variants.iter().map(|(v, _)| v.clone()))
                .collect(),
            Kind::Alternate { variants } => variants.iter().map(|(n, _)| n.clone()).collect(),
            Kind::Command { args, .. } => accepted_members(&s, args)
                .into_iter()
                .map(|m| m.name)
                .collect(),
            Kind::Event { data, .. } => data
                .as_ref()
                .map(|d| s.members_of(d))
                .unwrap_or_default()
                .into_iter()
                .map(|m| m.name)
                .collect(),
        };
        for m in &line[2..] {
            let m = m.trim_start_matches('*');
            if name == "blockdev-add" && m == "options" {
                continue;
            }
            if !have.contains(m) {
                problems.push(format!("{kind} {name}: '{m}' missing"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn generated_lists_match_the_schema() {
    let s = schema();
    let commands: Vec<&str> = s
        .entities
        .iter()
        .filter(|e| matches!(e.kind, Kind::Command { .. }))
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(qapi_types::cmd::ALL, commands.as_slice());
    let events: Vec<&str> = s
        .entities
        .iter()
        .filter(|e| matches!(e.kind, Kind::Event { .. }))
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(qapi_types::event::ALL, events.as_slice());
    // The introspection data names every command and event once.
    let info = qapi_types::full_schema_info();
    for name in commands.iter().chain(&events) {
        assert_eq!(
            info.iter().filter(|v| v["name"] == *name).count(),
            1,
            "{name}"
        );
    }
}

#[test]
fn modern_stable_forms_are_carried() {
    let s = schema();
    for name in [
        "blockdev-add",
        "blockdev-del",
        "x-blockdev-del",
        "blockdev-remove-medium",
        "blockdev-insert-medium",
        "x-blockdev-remove-medium",
        "x-blockdev-insert-medium",
        "query-cpus",
        "query-cpus-fast",
        "query-jobs",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-dismiss",
        "job-finalize",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-merge",
    ] {
        assert!(
            matches!(s.get(name).map(|e| &e.kind), Some(Kind::Command { .. })),
            "{name}"
        );
    }
    let Some(Kind::Command {
        args: Some(MembersRef::Named(t)),
        boxed: true,
        ..
    }) = s.get("blockdev-add").map(|e| &e.kind)
    else {
        panic!("blockdev-add takes BlockdevOptions boxed (the flat form)");
    };
    assert_eq!(t, "BlockdevOptions");
}
