//! `qapi-gen SCHEMA [OUT]`: checks a QAPI schema and writes the generated
//! Rust code to OUT (or standard output). Exit status 1 on an invalid schema.
//! `QAPI_CONFIG` lists the configuration symbols `if` conditions may test.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.len() > 2 || args[0] == "--help" || args[0] == "-h" {
        eprintln!("usage: qapi-gen SCHEMA.json [OUT.rs]\n\nChecks a QAPI schema and writes the Rust code generated from it.\nQAPI_CONFIG=SYM1,SYM2 enables configuration symbols for 'if' conditions.");
        return if args.first().is_some_and(|a| a == "--help" || a == "-h") {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    let config = qapi_gen::Config::from_list(&std::env::var("QAPI_CONFIG").unwrap_or_default());
    match qapi_gen::generate(Path::new(&args[0]), &config) {
        Ok(code) => {
            if let Some(out) = args.get(1) {
                if let Err(e) = std::fs::write(out, code) {
                    eprintln!("qapi-gen: cannot write {out}: {e}");
                    return ExitCode::FAILURE;
                }
            } else {
                print!("{code}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qapi-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
