//! Generates the schema's Rust code into OUT_DIR.
//!
//! The schema lives in the workspace's `schema/` directory; set
//! `QAPI_SCHEMA` to build against another `qapi-schema.json`, and
//! `QAPI_CONFIG` (comma-separated symbols) to enable `if` conditions.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=QAPI_SCHEMA");
    println!("cargo:rerun-if-env-changed=QAPI_CONFIG");
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let schema = std::env::var_os("QAPI_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../schema/qapi-schema.json"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("qapi.rs");
    // Configuration symbols that `if` conditions in the schema may test.
    let config = qapi_gen::Config::from_list(&std::env::var("QAPI_CONFIG").unwrap_or_default());
    match qapi_gen::generate_to(&schema, &out, &config) {
        Ok(files) => {
            for f in files {
                println!("cargo:rerun-if-changed={}", f.display());
            }
        }
        Err(e) => {
            eprintln!("error: invalid QAPI schema: {e}");
            std::process::exit(1);
        }
    }
}
