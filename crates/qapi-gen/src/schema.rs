//! The checked intermediate form of a QAPI schema.
//!
//! [`Schema::from_exprs`] turns parsed expressions into entities, rejects
//! every key the dialect does not know, and checks the references between
//! definitions, so that the code generators can rely on a consistent model.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::cond::Config;
use crate::parser::{Doc, Expr, TopLevel};
use crate::Error;

/// The built-in scalar types of QAPI.
pub const BUILTINS: &[&str] = &[
    "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
    "number", "bool", "null", "any", "QType",
];

/// The values of the built-in enum `QType`.
pub const QTYPE_VALUES: &[&str] = &[
    "none", "qnull", "qnum", "qstring", "qdict", "qlist", "qbool",
];

/// A reference to a type from a member, a variant or a return value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeRef {
    /// A named type (built-in or defined).
    Named(String),
    /// An array of a named type (`['T']`).
    Array(String),
}

impl TypeRef {
    /// The name of the type, or of the element type of an array.
    pub fn element(&self) -> &str {
        match self {
            TypeRef::Named(n) | TypeRef::Array(n) => n,
        }
    }
}

/// A member of a struct, of a union base, or of command or event arguments.
#[derive(Debug, Clone)]
pub struct Member {
    /// The wire name.
    pub name: String,
    /// The type.
    pub ty: TypeRef,
    /// Whether the member may be absent (`*name` in the schema).
    pub optional: bool,
    /// Features such as `deprecated`.
    pub features: Vec<String>,
}

/// A value of an enum.
#[derive(Debug, Clone)]
pub struct EnumValue {
    /// The wire name.
    pub name: String,
    /// Features such as `deprecated`.
    pub features: Vec<String>,
}

/// Members given inline or by naming a struct.
#[derive(Debug, Clone)]
pub enum MembersRef {
    /// Members written in place.
    Inline(Vec<Member>),
    /// The members of a named struct (or, for boxed commands, a union).
    Named(String),
}

/// The kinds of definition.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `{ 'enum': ... }`
    Enum {
        /// The values, in order.
        values: Vec<EnumValue>,
        /// The C prefix (kept for completeness; Rust names do not use it).
        prefix: Option<String>,
    },
    /// `{ 'struct': ... }`
    Struct {
        /// The base struct, whose members come first.
        base: Option<String>,
        /// The struct's own members.
        members: Vec<Member>,
    },
    /// A flat union: `{ 'union': ..., 'base': ..., 'discriminator': ..., 'data': ... }`.
    Union {
        /// The common members, one of which is the discriminator.
        base: MembersRef,
        /// The name of the discriminator member (an enum).
        discriminator: String,
        /// Branches: discriminator value and the struct holding that branch's members.
        variants: Vec<(String, String)>,
    },
    /// `{ 'alternate': ... }`
    Alternate {
        /// Branches: name and type.
        variants: Vec<(String, TypeRef)>,
    },
    /// `{ 'command': ... }`
    Command {
        /// The arguments, if any.
        args: Option<MembersRef>,
        /// Whether the arguments are passed as one value of the named type.
        boxed: bool,
        /// The return type; `None` returns an empty object.
        returns: Option<TypeRef>,
        /// Whether the command may run out of band (`exec-oob`).
        allow_oob: bool,
        /// Whether the command may run before machine initialisation.
        allow_preconfig: bool,
    },
    /// `{ 'event': ... }`
    Event {
        /// The data members, if any.
        data: Option<MembersRef>,
        /// Whether the data is one value of the named type.
        boxed: bool,
    },
}

/// One definition of the schema.
#[derive(Debug, Clone)]
pub struct Entity {
    /// The name as the schema spells it.
    pub name: String,
    /// What it defines.
    pub kind: Kind,
    /// Its doc comment.
    pub doc: Option<Doc>,
    /// The module (schema file stem) it comes from: the command group.
    pub module: String,
    /// Features such as `deprecated` or `unstable`.
    pub features: Vec<String>,
    /// Where it was defined, for messages.
    pub location: String,
}

impl Entity {
    /// The definition's kind as the schema spells it.
    pub fn meta(&self) -> &'static str {
        match self.kind {
            Kind::Enum { .. } => "enum",
            Kind::Struct { .. } => "struct",
            Kind::Union { .. } => "union",
            Kind::Alternate { .. } => "alternate",
            Kind::Command { .. } => "command",
            Kind::Event { .. } => "event",
        }
    }
}

/// A checked schema.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Every definition, in source order.
    pub entities: Vec<Entity>,
    index: HashMap<String, usize>,
}

impl Schema {
    /// Parses the schema file at `path` (following includes) and checks it,
    /// with no configuration symbol enabled.
    pub fn load(path: &Path) -> Result<Schema, Error> {
        Schema::load_with(path, &Config::default())
    }

    /// Parses and checks the schema at `path`, keeping only what the `if`
    /// conditions enable under `config`.
    pub fn load_with(path: &Path, config: &Config) -> Result<Schema, Error> {
        Schema::from_exprs_with(crate::parser::parse_file(path)?, config)
    }

    /// Builds and checks the schema from parsed top-level expressions, with
    /// no configuration symbol enabled.
    pub fn from_exprs(tops: Vec<TopLevel>) -> Result<Schema, Error> {
        Schema::from_exprs_with(tops, &Config::default())
    }

    /// Builds and checks the schema from parsed top-level expressions,
    /// applying `if` conditions under `config`.
    pub fn from_exprs_with(tops: Vec<TopLevel>, config: &Config) -> Result<Schema, Error> {
        let mut entities = Vec::new();
        for mut top in tops {
            if top.expr.get("pragma").is_some() {
                continue;
            }
            let location = format!("{}:{}", top.file.display(), top.line);
            match config
                .prune(&top.expr)
                .map_err(|e| Error::msg(format!("{location}: {e}")))?
            {
                Some(expr) => top.expr = expr,
                None => continue,
            }
            entities.push(entity(top)?);
        }
        let mut index = HashMap::new();
        for (i, e) in entities.iter().enumerate() {
            if BUILTINS.contains(&e.name.as_str()) {
                return Err(Error::msg(format!(
                    "{}: '{}' redefines a built-in type",
                    e.location, e.name
                )));
            }
            if let Some(prev) = index.insert(e.name.clone(), i) {
                let prev: &Entity = &entities[prev];
                return Err(Error::msg(format!(
                    "{}: '{}' is already defined at {}",
                    e.location, e.name, prev.location
                )));
            }
        }
        let schema = Schema { entities, index };
        schema.check()?;
        Ok(schema)
    }

    /// Looks up a definition by name.
    pub fn get(&self, name: &str) -> Option<&Entity> {
        self.index.get(name).map(|&i| &self.entities[i])
    }

    /// All members of a struct, its bases' first.
    pub fn struct_members(&self, name: &str) -> Vec<Member> {
        let mut out = Vec::new();
        let mut chain = Vec::new();
        let mut cur = Some(name.to_owned());
        while let Some(n) = cur {
            if chain.contains(&n) {
                break;
            }
            chain.push(n.clone());
            cur = match self.get(&n).map(|e| &e.kind) {
                Some(Kind::Struct { base, .. }) => base.clone(),
                _ => None,
            };
        }
        for n in chain.iter().rev() {
            if let Some(Kind::Struct { members, .. }) = self.get(n).map(|e| &e.kind) {
                out.extend(members.iter().cloned());
            }
        }
        out
    }

    /// The members a [`MembersRef`] stands for.
    pub fn members_of(&self, r: &MembersRef) -> Vec<Member> {
        match r {
            MembersRef::Inline(m) => m.clone(),
            MembersRef::Named(n) => self.struct_members(n),
        }
    }

    /// The values of an enum (built-in `QType` included).
    pub fn enum_values(&self, name: &str) -> Option<Vec<String>> {
        if name == "QType" {
            return Some(QTYPE_VALUES.iter().map(|s| s.to_string()).collect());
        }
        match &self.get(name)?.kind {
            Kind::Enum { values, .. } => Some(values.iter().map(|v| v.name.clone()).collect()),
            _ => None,
        }
    }

    fn is_type(&self, name: &str) -> bool {
        BUILTINS.contains(&name)
            || matches!(
                self.get(name).map(|e| &e.kind),
                Some(
                    Kind::Enum { .. }
                        | Kind::Struct { .. }
                        | Kind::Union { .. }
                        | Kind::Alternate { .. }
                )
            )
    }

    fn check(&self) -> Result<(), Error> {
        for e in &self.entities {
            let fail = |msg: String| Error::msg(format!("{}: {}: {}", e.location, e.name, msg));
            let check_ty = |t: &TypeRef, what: &str| -> Result<(), Error> {
                if self.is_type(t.element()) {
                    Ok(())
                } else {
                    Err(fail(format!("{what} uses unknown type '{}'", t.element())))
                }
            };
            let check_members = |ms: &[Member]| -> Result<(), Error> {
                let mut seen = HashSet::new();
                for m in ms {
                    if !seen.insert(m.name.as_str()) {
                        return Err(fail(format!("member '{}' appears twice", m.name)));
                    }
                    check_ty(&m.ty, &format!("member '{}'", m.name))?;
                }
                Ok(())
            };
            let check_ref = |r: &MembersRef, allow_union: bool| -> Result<(), Error> {
                match r {
                    MembersRef::Inline(ms) => check_members(ms),
                    MembersRef::Named(n) => match self.get(n).map(|e| &e.kind) {
                        Some(Kind::Struct { .. }) => Ok(()),
                        Some(Kind::Union { .. }) if allow_union => Ok(()),
                        _ => Err(fail(format!("'{n}' is not a struct"))),
                    },
                }
            };
            match &e.kind {
                Kind::Enum { values, .. } => {
                    let mut seen = HashSet::new();
                    for v in values {
                        if !seen.insert(v.name.as_str()) {
                            return Err(fail(format!("value '{}' appears twice", v.name)));
                        }
                    }
                }
                Kind::Struct { base, members } => {
                    if let Some(b) = base {
                        if !matches!(self.get(b).map(|e| &e.kind), Some(Kind::Struct { .. })) {
                            return Err(fail(format!("base '{b}' is not a struct")));
                        }
                    }
                    check_members(members)?;
                    check_members(&self.struct_members(&e.name))?;
                }
                Kind::Union {
                    base,
                    discriminator,
                    variants,
                } => {
                    check_ref(base, false)?;
                    let members = self.members_of(base);
                    let Some(d) = members.iter().find(|m| &m.name == discriminator) else {
                        return Err(fail(format!(
                            "discriminator '{discriminator}' is not a member of the base"
                        )));
                    };
                    if d.optional {
                        return Err(fail(format!(
                            "discriminator '{discriminator}' must not be optional"
                        )));
                    }
                    let TypeRef::Named(dt) = &d.ty else {
                        return Err(fail("discriminator must be an enum".into()));
                    };
                    let Some(values) = self.enum_values(dt) else {
                        return Err(fail(format!("discriminator type '{dt}' is not an enum")));
                    };
                    for (value, ty) in variants {
                        if !values.contains(value) {
                            return Err(fail(format!("branch '{value}' is not a value of '{dt}'")));
                        }
                        if !matches!(self.get(ty).map(|e| &e.kind), Some(Kind::Struct { .. })) {
                            return Err(fail(format!(
                                "branch '{value}' type '{ty}' is not a struct"
                            )));
                        }
                        let names: HashSet<String> =
                            members.iter().map(|m| m.name.clone()).collect();
                        if let Some(clash) = self
                            .struct_members(ty)
                            .iter()
                            .find(|m| names.contains(&m.name))
                        {
                            return Err(fail(format!(
                                "branch '{value}' member '{}' clashes with the base",
                                clash.name
                            )));
                        }
                    }
                }
                Kind::Alternate { variants } => {
                    let mut json_kinds = HashSet::new();
                    for (name, ty) in variants {
                        check_ty(ty, &format!("branch '{name}'"))?;
                        for k in self.json_kinds(ty) {
                            if !json_kinds.insert(k) {
                                return Err(fail(format!(
                                    "branch '{name}' can't be distinguished from an earlier one"
                                )));
                            }
                        }
                    }
                }
                Kind::Command {
                    args,
                    boxed,
                    returns,
                    ..
                } => {
                    if let Some(a) = args {
                        check_ref(a, *boxed)?;
                    }
                    if *boxed && !matches!(args, Some(MembersRef::Named(_))) {
                        return Err(fail("'boxed' needs 'data' naming a type".into()));
                    }
                    if let Some(r) = returns {
                        check_ty(r, "'returns'")?;
                    }
                }
                Kind::Event { data, boxed } => {
                    if let Some(d) = data {
                        check_ref(d, *boxed)?;
                    }
                    if *boxed && !matches!(data, Some(MembersRef::Named(_))) {
                        return Err(fail("'boxed' needs 'data' naming a type".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The JSON kinds a value of this type can take (for alternate checks).
    pub fn json_kinds(&self, ty: &TypeRef) -> Vec<&'static str> {
        let name = match ty {
            TypeRef::Array(_) => return vec!["array"],
            TypeRef::Named(n) => n.as_str(),
        };
        match name {
            "str" | "QType" => vec!["string"],
            "number" => vec!["number"],
            "bool" => vec!["boolean"],
            "null" => vec!["null"],
            "any" => vec!["string", "number", "boolean", "null", "object", "array"],
            n if BUILTINS.contains(&n) => vec!["number"],
            n => match self.get(n).map(|e| &e.kind) {
                Some(Kind::Enum { .. }) => vec!["string"],
                Some(Kind::Struct { .. } | Kind::Union { .. }) => vec!["object"],
                _ => vec![],
            },
        }
    }
}

const COMMON_KEYS: &[&str] = &["features", "if"];

fn entity(top: TopLevel) -> Result<Entity, Error> {
    let location = format!("{}:{}", top.file.display(), top.line);
    let fail = |msg: String| Error::msg(format!("{location}: {msg}"));
    let dict = top.expr.as_dict().unwrap_or(&[]);
    let (meta, name) = dict
        .first()
        .and_then(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .ok_or_else(|| fail("expression must start with its kind and name".into()))?;
    let allowed: &[&str] = match meta {
        "enum" => &["data", "prefix"],
        "struct" => &["data", "base"],
        "union" => &["data", "base", "discriminator"],
        "alternate" => &["data"],
        "command" => &[
            "data",
            "returns",
            "boxed",
            "allow-oob",
            "allow-preconfig",
            "coroutine",
        ],
        "event" => &["data", "boxed"],
        other => return Err(fail(format!("unknown expression kind '{other}'"))),
    };
    for (k, _) in &dict[1..] {
        if !allowed.contains(&k.as_str()) && !COMMON_KEYS.contains(&k.as_str()) {
            return Err(fail(format!("{meta} '{name}' has unknown key '{k}'")));
        }
    }
    let get = |k: &str| top.expr.get(k);
    let flag = |k: &str| -> Result<bool, Error> {
        match get(k) {
            None => Ok(false),
            Some(Expr::Bool(b)) => Ok(*b),
            Some(_) => Err(fail(format!("'{k}' must be true or false"))),
        }
    };
    let entity_features = features(get("features")).map_err(&fail)?;
    let kind = match meta {
        "enum" => {
            let Some(Expr::List(items)) = get("data") else {
                return Err(fail(format!("enum '{name}' needs a 'data' list")));
            };
            let mut values = Vec::new();
            for item in items {
                let (vname, vfeatures) = match item {
                    Expr::Str(s) => (s.clone(), Vec::new()),
                    Expr::Dict(_) => (
                        item.get("name")
                            .and_then(Expr::as_str)
                            .ok_or_else(|| fail("enum value needs a 'name'".into()))?
                            .to_owned(),
                        features(item.get("features")).map_err(&fail)?,
                    ),
                    _ => return Err(fail("enum values are strings or objects".into())),
                };
                values.push(EnumValue {
                    name: vname,
                    features: vfeatures,
                });
            }
            let prefix = get("prefix").and_then(Expr::as_str).map(str::to_owned);
            Kind::Enum { values, prefix }
        }
        "struct" => Kind::Struct {
            base: match get("base") {
                None => None,
                Some(Expr::Str(s)) => Some(s.clone()),
                Some(_) => return Err(fail("a struct's 'base' must name a struct".into())),
            },
            members: match get("data") {
                Some(d @ Expr::Dict(_)) => members(d).map_err(&fail)?,
                _ => return Err(fail(format!("struct '{name}' needs a 'data' object"))),
            },
        },
        "union" => {
            let base = match get("base") {
                Some(Expr::Str(s)) => MembersRef::Named(s.clone()),
                Some(d @ Expr::Dict(_)) => MembersRef::Inline(members(d).map_err(&fail)?),
                _ => {
                    return Err(fail(format!(
                        "union '{name}' needs a 'base' (only flat unions are supported)"
                    )))
                }
            };
            let discriminator = get("discriminator")
                .and_then(Expr::as_str)
                .ok_or_else(|| fail(format!("union '{name}' needs a 'discriminator'")))?
                .to_owned();
            let Some(Expr::Dict(branches)) = get("data") else {
                return Err(fail(format!("union '{name}' needs a 'data' object")));
            };
            let mut variants = Vec::new();
            for (value, ty) in branches {
                let ty = match ty {
                    Expr::Str(s) => s.clone(),
                    Expr::Dict(_) => ty
                        .get("type")
                        .and_then(Expr::as_str)
                        .ok_or_else(|| fail(format!("branch '{value}' needs a type")))?
                        .to_owned(),
                    _ => return Err(fail(format!("branch '{value}' must name a struct"))),
                };
                variants.push((value.clone(), ty));
            }
            Kind::Union {
                base,
                discriminator,
                variants,
            }
        }
        "alternate" => {
            let Some(Expr::Dict(branches)) = get("data") else {
                return Err(fail(format!("alternate '{name}' needs a 'data' object")));
            };
            let mut variants = Vec::new();
            for (bname, ty) in branches {
                variants.push((bname.clone(), member_type(ty).map_err(&fail)?));
            }
            Kind::Alternate { variants }
        }
        "command" => Kind::Command {
            args: members_ref(get("data")).map_err(&fail)?,
            boxed: flag("boxed")?,
            returns: match get("returns") {
                None => None,
                Some(r) => Some(member_type(r).map_err(&fail)?),
            },
            allow_oob: flag("allow-oob")?,
            allow_preconfig: flag("allow-preconfig")?,
        },
        "event" => Kind::Event {
            data: members_ref(get("data")).map_err(&fail)?,
            boxed: flag("boxed")?,
        },
        _ => unreachable!("kinds are matched above"),
    };
    let module = top
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(doc) = &top.doc {
        if let Some(sym) = &doc.symbol {
            if sym != name {
                return Err(fail(format!("doc comment for '{sym}' precedes '{name}'")));
            }
        }
    }
    Ok(Entity {
        name: name.to_owned(),
        kind,
        doc: top.doc,
        module,
        features: entity_features,
        location,
    })
}

fn features(e: Option<&Expr>) -> Result<Vec<String>, String> {
    let Some(e) = e else { return Ok(Vec::new()) };
    let Expr::List(items) = e else {
        return Err("'features' must be a list".into());
    };
    items
        .iter()
        .map(|i| match i {
            Expr::Str(s) => Ok(s.clone()),
            Expr::Dict(_) => i
                .get("name")
                .and_then(Expr::as_str)
                .map(str::to_owned)
                .ok_or_else(|| "feature needs a 'name'".to_owned()),
            _ => Err("features are strings or objects".to_owned()),
        })
        .collect()
}

fn member_type(e: &Expr) -> Result<TypeRef, String> {
    match e {
        Expr::Str(s) => Ok(TypeRef::Named(s.clone())),
        Expr::List(items) => match items.as_slice() {
            [Expr::Str(s)] => Ok(TypeRef::Array(s.clone())),
            _ => Err("an array type is a list of exactly one type name".into()),
        },
        Expr::Dict(_) => match e.get("type") {
            Some(t) => member_type(t),
            None => Err("a member object needs a 'type'".into()),
        },
        Expr::Bool(_) => Err("a type can't be a boolean".into()),
    }
}

fn members(e: &Expr) -> Result<Vec<Member>, String> {
    let mut out = Vec::new();
    for (key, ty) in e.as_dict().unwrap_or(&[]) {
        let (name, optional) = match key.strip_prefix('*') {
            Some(n) => (n.to_owned(), true),
            None => (key.clone(), false),
        };
        let feats = match ty {
            Expr::Dict(_) => features(ty.get("features"))?,
            _ => Vec::new(),
        };
        out.push(Member {
            name,
            ty: member_type(ty)?,
            optional,
            features: feats,
        });
    }
    Ok(out)
}

fn members_ref(e: Option<&Expr>) -> Result<Option<MembersRef>, String> {
    match e {
        None => Ok(None),
        Some(Expr::Str(s)) => Ok(Some(MembersRef::Named(s.clone()))),
        Some(d @ Expr::Dict(_)) => Ok(Some(MembersRef::Inline(members(d)?))),
        Some(_) => Err("'data' must be an object or a type name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_str;

    fn load(text: &str) -> Result<Schema, Error> {
        Schema::from_exprs(parse_str(text, Path::new("m.json"))?)
    }

    #[test]
    fn resolves_bases_and_checks_unions() {
        let s = load(
            "{ 'enum': 'Kind', 'data': ['a', 'b'] }\n\
             { 'struct': 'Base', 'data': { 'kind': 'Kind', '*x': 'int' } }\n\
             { 'struct': 'A', 'data': { 'y': 'str' } }\n\
             { 'struct': 'Sub', 'base': 'Base', 'data': { 'z': ['A'] } }\n\
             { 'union': 'U', 'base': 'Base', 'discriminator': 'kind', 'data': { 'a': 'A' } }\n\
             { 'command': 'c', 'data': 'U', 'boxed': true, 'returns': ['Sub'] }\n",
        )
        .unwrap();
        let names: Vec<_> = s
            .struct_members("Sub")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["kind", "x", "z"]);
        assert_eq!(s.get("c").unwrap().module, "m");
    }

    #[test]
    fn rejects_inconsistent_schemas() {
        for (bad, why) in [
            ("{ 'struct': 'S', 'data': { 'a': 'Nope' } }", "unknown type"),
            ("{ 'struct': 'S', 'data': {} }\n{ 'enum': 'S', 'data': [] }", "already defined"),
            ("{ 'struct': 'S', 'data': {}, 'bogus': 1 }", "stray"),
            ("{ 'struct': 'S', 'data': {}, 'bogus': 'x' }", "unknown key"),
            ("{ 'struct': 'S', 'data': {}, 'if': { 'maybe': 'X' } }", "condition"),
            ("{ 'enum': 'E', 'data': ['a', 'a'] }", "twice"),
            (
                "{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'A', 'data': {} }\n\
                 { 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'zz': 'A' } }",
                "not a value",
            ),
            (
                "{ 'alternate': 'Alt', 'data': { 'a': 'int', 'b': 'size' } }",
                "distinguished",
            ),
            ("{ 'union': 'U', 'data': { 'a': 'int' } }", "flat unions"),
            ("{ 'frob': 'X' }", "unknown expression kind"),
            ("{ 'data': {}, 'struct': 'S' }", "kind and name"),
            ("{ 'enum': 'E', 'data': 'x' }", "'data' list"),
            ("{ 'enum': 'E', 'data': [ { 'if': 'X' } ] }", "needs a 'name'"),
            ("{ 'enum': 'E', 'data': [ true ] }", "strings or objects"),
            ("{ 'enum': 'E', 'data': [], 'features': 'x' }", "must be a list"),
            ("{ 'enum': 'E', 'data': [], 'features': [ {} ] }", "feature needs a 'name'"),
            ("{ 'enum': 'E', 'data': [], 'features': [ true ] }", "features are strings"),
            ("{ 'struct': 'S', 'base': [ 'x' ], 'data': {} }", "must name a struct"),
            ("{ 'struct': 'S' }", "'data' object"),
            ("{ 'struct': 'S', 'base': 'Nope', 'data': {} }", "is not a struct"),
            ("{ 'struct': 'S', 'data': { 'a': true } }", "boolean"),
            ("{ 'struct': 'S', 'data': { 'a': [ 'int', 'str' ] } }", "exactly one type"),
            ("{ 'struct': 'S', 'data': { 'a': { 'if': 'X' } } }", "needs a 'type'"),
            ("{ 'struct': 'B', 'data': { 'a': 'int' } }\n{ 'struct': 'S', 'base': 'B', 'data': { 'a': 'str' } }", "twice"),
            ("{ 'union': 'U', 'base': { 'k': 'str' }, 'data': {} }", "'discriminator'"),
            ("{ 'union': 'U', 'base': { 'k': 'str' }, 'discriminator': 'k' }", "'data' object"),
            ("{ 'union': 'U', 'base': { 'k': 'str' }, 'discriminator': 'z', 'data': {} }", "not a member of the base"),
            ("{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': { '*k': 'E' }, 'discriminator': 'k', 'data': {} }", "must not be optional"),
            ("{ 'union': 'U', 'base': { 'k': 'str' }, 'discriminator': 'k', 'data': {} }", "not an enum"),
            ("{ 'union': 'U', 'base': { 'k': ['str'] }, 'discriminator': 'k', 'data': {} }", "must be an enum"),
            ("{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'a': 'int' } }", "is not a struct"),
            ("{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'a': { 'if': 'X' } } }", "needs a type"),
            ("{ 'enum': 'E', 'data': ['a'] }\n{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'a': true } }", "must name a struct"),
            ("{ 'enum': 'E', 'data': ['a'] }\n{ 'struct': 'A', 'data': { 'k': 'int' } }\n{ 'union': 'U', 'base': { 'k': 'E' }, 'discriminator': 'k', 'data': { 'a': 'A' } }", "clashes with the base"),
            ("{ 'union': 'U', 'base': 'Nope', 'discriminator': 'k', 'data': {} }", "is not a struct"),
            ("{ 'alternate': 'A' }", "'data' object"),
            ("{ 'alternate': 'A', 'data': { 'x': 'Nope' } }", "unknown type"),
            ("{ 'command': 'c', 'data': [ 'x' ] }", "object or a type name"),
            ("{ 'command': 'c', 'boxed': 'yes' }", "true or false"),
            ("{ 'command': 'c', 'returns': 'Nope' }", "unknown type"),
            ("{ 'command': 'c', 'data': 'Nope' }", "is not a struct"),
            ("{ 'event': 'E', 'boxed': true }", "boxed"),
            ("{ 'event': 'E', 'data': { 'x': 'Nope' } }", "unknown type"),
            ("{ 'struct': 'int', 'data': {} }", "built-in"),
            ("##\n# @Other:\n##\n{ 'struct': 'S', 'data': {} }", "precedes"),
            ("{ 'command': 'c', 'data': { 'a': 'int' }, 'boxed': true }", "boxed"),
        ] {
            let err = load(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
