//! Rust names for QAPI names.

use proc_macro2::{Ident, Span};

const KEYWORDS: &[&str] = &[
    "as", "break", "const", "continue", "crate", "else", "enum", "extern", "false", "fn", "for",
    "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
    "self", "Self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use", "where",
    "while", "async", "await", "dyn", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "typeof", "unsized", "virtual", "yield", "try", "gen",
];

/// `node-name` -> `node_name`, `fooBar` -> `foo_bar`; keywords become raw identifiers.
pub fn snake(name: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if c == '-' || c == '.' || c == '_' || c == '+' {
            out.push('_');
            prev_lower = false;
        } else if c.is_ascii_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
            prev_lower = false;
        } else {
            out.push(c);
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// `null-co` -> `NullCo`, `x86_64` -> `X86_64`-free `X8664`; a leading digit gets a `V`.
pub fn camel(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_', '.', '+']) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// An identifier, raw where the name is a keyword.
pub fn ident(name: &str) -> Ident {
    if KEYWORDS.contains(&name) {
        match name {
            // These can't be raw identifiers.
            "self" | "Self" | "super" | "crate" => {
                Ident::new(&format!("{name}_"), Span::call_site())
            }
            _ => Ident::new_raw(name, Span::call_site()),
        }
    } else {
        Ident::new(name, Span::call_site())
    }
}

/// The field identifier for a member name.
pub fn field(name: &str) -> Ident {
    ident(&snake(name))
}

/// The type identifier for a schema type name.
pub fn type_ident(name: &str) -> Ident {
    ident(&camel(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_names() {
        assert_eq!(snake("node-name"), "node_name");
        assert_eq!(snake("rd_bytes"), "rd_bytes");
        assert_eq!(snake("iops_rd_max"), "iops_rd_max");
        assert_eq!(snake("vmState"), "vm_state");
        assert_eq!(snake("x-perf"), "x_perf");
        assert_eq!(camel("null-co"), "NullCo");
        assert_eq!(camel("qcow2"), "Qcow2");
        assert_eq!(camel("1"), "V1");
        assert_eq!(camel("host_device"), "HostDevice");
        assert_eq!(camel("BlockInfo"), "BlockInfo");
        assert_eq!(field("type").to_string(), "r#type");
        assert_eq!(field("self").to_string(), "self_");
    }
}
