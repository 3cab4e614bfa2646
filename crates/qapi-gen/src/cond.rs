//! QAPI's `if` conditions: `'SYMBOL'`, `{'all': [...]}`, `{'any': [...]}`
//! and `{'not': ...}` on definitions, members, enum values, union and
//! alternate branches, and features.
//!
//! Conditions are evaluated at generation time against the configuration
//! symbols enabled in a [`Config`]; whatever is disabled is removed from the
//! schema before it is checked, so it is neither generated nor introspected,
//! as with a QEMU build that lacks the feature.

use std::collections::BTreeSet;

use crate::parser::Expr;

/// The configuration symbols (e.g. `CONFIG_KVM`) that are enabled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Enabled symbols.
    pub enabled: BTreeSet<String>,
}

impl Config {
    /// A configuration from a comma- or space-separated list of symbols.
    pub fn from_list(list: &str) -> Config {
        Config {
            enabled: list
                .split([',', ' '])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Evaluates a condition.
    pub fn eval(&self, cond: &Expr) -> Result<bool, String> {
        match cond {
            Expr::Str(sym) if !sym.is_empty() => Ok(self.enabled.contains(sym)),
            Expr::Dict(d) if d.len() == 1 => {
                let (op, arg) = &d[0];
                match (op.as_str(), arg) {
                    ("all", Expr::List(items)) if !items.is_empty() => {
                        items.iter().try_fold(true, |acc, c| Ok(acc & self.eval(c)?))
                    }
                    ("any", Expr::List(items)) if !items.is_empty() => {
                        items.iter().try_fold(false, |acc, c| Ok(acc | self.eval(c)?))
                    }
                    ("not", c) => Ok(!self.eval(c)?),
                    _ => Err(format!("'if' condition '{op}' is not all/any/not with a non-empty argument")),
                }
            }
            _ => Err("'if' condition must be a symbol or one of {'all': [...]}, {'any': [...]}, {'not': ...}".into()),
        }
    }

    /// Applies the conditions inside a top-level expression: returns `None`
    /// when the whole definition is disabled, else the expression without
    /// its disabled parts and without any `if` key.
    pub fn prune(&self, expr: &Expr) -> Result<Option<Expr>, String> {
        let Expr::Dict(top) = expr else {
            return Ok(Some(expr.clone()));
        };
        if let Some((_, cond)) = top.iter().find(|(k, _)| k == "if") {
            if !self.eval(cond)? {
                return Ok(None);
            }
        }
        let mut out = Vec::new();
        for (k, v) in top {
            match k.as_str() {
                "if" => {}
                // Members, branches, enum values and features may carry conditions.
                "data" | "base" | "features" => out.push((k.clone(), self.prune_items(v)?)),
                _ => out.push((k.clone(), v.clone())),
            }
        }
        Ok(Some(Expr::Dict(out)))
    }

    /// Drops disabled entries of a `data`/`base` object or of an enum-value
    /// or feature list; an entry is conditional when it is an object with an
    /// `if` key beside its `type` or `name`.
    fn prune_items(&self, v: &Expr) -> Result<Expr, String> {
        let keep = |item: &Expr| -> Result<Option<Expr>, String> {
            match item {
                Expr::Dict(d)
                    if d.iter().any(|(k, _)| k == "if")
                        && d.iter().any(|(k, _)| k == "type" || k == "name") =>
                {
                    let cond = item.get("if").expect("checked above");
                    Ok(self.eval(cond)?.then(|| {
                        Expr::Dict(d.iter().filter(|(k, _)| k != "if").cloned().collect())
                    }))
                }
                other => Ok(Some(other.clone())),
            }
        };
        Ok(match v {
            Expr::Dict(d) => {
                let mut out = Vec::new();
                for (k, item) in d {
                    if let Some(item) = keep(item)? {
                        out.push((k.clone(), item));
                    }
                }
                Expr::Dict(out)
            }
            Expr::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    if let Some(item) = keep(item)? {
                        out.push(item);
                    }
                }
                Expr::List(out)
            }
            other => other.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_str;
    use std::path::Path;

    fn expr(text: &str) -> Expr {
        parse_str(text, Path::new("t")).unwrap().remove(0).expr
    }

    #[test]
    fn evaluates_conditions() {
        let cfg = Config::from_list("CONFIG_KVM, CONFIG_LINUX");
        let e = |s: &str| expr(&format!("{{ 'c': {s} }}")).get("c").unwrap().clone();
        assert!(cfg.eval(&e("'CONFIG_KVM'")).unwrap());
        assert!(!cfg.eval(&e("'CONFIG_XEN'")).unwrap());
        assert!(cfg
            .eval(&e("{ 'all': [ 'CONFIG_KVM', 'CONFIG_LINUX' ] }"))
            .unwrap());
        assert!(!cfg
            .eval(&e("{ 'all': [ 'CONFIG_KVM', 'CONFIG_XEN' ] }"))
            .unwrap());
        assert!(cfg
            .eval(&e("{ 'any': [ 'CONFIG_XEN', 'CONFIG_LINUX' ] }"))
            .unwrap());
        assert!(cfg.eval(&e("{ 'not': 'CONFIG_XEN' }")).unwrap());
        for bad in [
            "{ 'all': [] }",
            "{ 'maybe': 'X' }",
            "[ 'X' ]",
            "''",
            "{ 'not': 'A', 'all': ['B'] }",
        ] {
            assert!(cfg.eval(&e(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn prunes_definitions_members_values_and_branches() {
        let cfg = Config::from_list("ON");
        assert_eq!(
            cfg.prune(&expr("{ 'struct': 'S', 'data': {}, 'if': 'OFF' }"))
                .unwrap(),
            None
        );
        let s = cfg
            .prune(&expr(
                "{ 'struct': 'S', 'if': 'ON', 'data': { 'a': 'int', 'b': { 'type': 'int', 'if': 'OFF' }, \
                 'c': { 'type': 'int', 'if': { 'not': 'OFF' } } }, 'features': [ { 'name': 'f', 'if': 'OFF' } ] }",
            ))
            .unwrap()
            .unwrap();
        let data = s.get("data").unwrap().as_dict().unwrap();
        let names: Vec<&str> = data.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(data[1].1, expr("{ 'type': 'int' }"));
        assert_eq!(s.get("features"), Some(&Expr::List(vec![])));
        assert!(s.get("if").is_none());
        let e = cfg
            .prune(&expr("{ 'enum': 'E', 'data': [ 'x', { 'name': 'y', 'if': 'OFF' }, { 'name': 'z', 'if': 'ON' } ] }"))
            .unwrap()
            .unwrap();
        assert_eq!(
            e.get("data"),
            Some(
                &expr("{ 'l': [ 'x', { 'name': 'z' } ] }")
                    .get("l")
                    .unwrap()
                    .clone()
            )
        );
    }
}
