//! The `query-qmp-schema` data (a list of SchemaInfo), built the way QEMU's
//! `scripts/qapi/introspect.py` builds it.
//!
//! Commands and events are listed by name; every type they use is listed
//! under a number instead of its name (QEMU hides type names so clients look
//! at commands and events, not at types); all integer types appear as the
//! built-in `int`; arrays are named `[element]`; enum values without a union
//! branch get the empty object type as their branch.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::schema::{Kind, Member, MembersRef, Schema, TypeRef, BUILTINS, QTYPE_VALUES};

const EMPTY: &str = "q_empty";

/// A type as introspection sees it: named, an array, or an implicit object.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum IType {
    Named(String),
    Array(Box<IType>),
    /// Inline members of a command, event or union base: (owner, role).
    Implicit(String, &'static str),
}

struct Introspector<'a> {
    schema: &'a Schema,
    names: HashMap<IType, String>,
    queue: Vec<IType>,
    emitted: Vec<IType>,
    out: Vec<Value>,
}

/// Builds the complete SchemaInfo list of a schema.
pub fn schema_info(schema: &Schema) -> Vec<Value> {
    let mut i = Introspector {
        schema,
        names: HashMap::new(),
        queue: Vec::new(),
        emitted: Vec::new(),
        out: Vec::new(),
    };
    for e in &schema.entities {
        let features = &e.features;
        match &e.kind {
            Kind::Command {
                args,
                returns,
                allow_oob,
                ..
            } => {
                let arg = i.args_type(&e.name, args.as_ref(), "arg");
                let ret = match returns {
                    Some(t) => i.use_type(&IType::from_ref(t)),
                    None => i.use_type(&IType::Named(EMPTY.into())),
                };
                let mut obj = Map::new();
                obj.insert("name".into(), json!(e.name));
                obj.insert("meta-type".into(), json!("command"));
                obj.insert("arg-type".into(), json!(arg));
                obj.insert("ret-type".into(), json!(ret));
                if *allow_oob {
                    obj.insert("allow-oob".into(), json!(true));
                }
                add_features(&mut obj, features);
                i.out.push(Value::Object(obj));
            }
            Kind::Event { data, .. } => {
                let arg = i.args_type(&e.name, data.as_ref(), "data");
                let mut obj = Map::new();
                obj.insert("name".into(), json!(e.name));
                obj.insert("meta-type".into(), json!("event"));
                obj.insert("arg-type".into(), json!(arg));
                add_features(&mut obj, features);
                i.out.push(Value::Object(obj));
            }
            _ => {}
        }
    }
    while !i.queue.is_empty() {
        let t = i.queue.remove(0);
        i.emit(t);
    }
    i.out
}

fn add_features(obj: &mut Map<String, Value>, features: &[String]) {
    if !features.is_empty() {
        obj.insert("features".into(), json!(features));
    }
}

impl IType {
    fn from_ref(t: &TypeRef) -> IType {
        match t {
            TypeRef::Named(n) => IType::Named(n.clone()),
            TypeRef::Array(n) => IType::Array(Box::new(IType::Named(n.clone()))),
        }
    }
}

fn is_int(name: &str) -> bool {
    matches!(
        name,
        "int"
            | "int8"
            | "int16"
            | "int32"
            | "int64"
            | "uint8"
            | "uint16"
            | "uint32"
            | "uint64"
            | "size"
    )
}

impl Introspector<'_> {
    fn args_type(&mut self, owner: &str, r: Option<&MembersRef>, role: &'static str) -> String {
        match r {
            None => self.use_type(&IType::Named(EMPTY.into())),
            Some(MembersRef::Inline(ms)) if ms.is_empty() => {
                self.use_type(&IType::Named(EMPTY.into()))
            }
            Some(MembersRef::Inline(_)) => self.use_type(&IType::Implicit(owner.into(), role)),
            Some(MembersRef::Named(n)) => self.use_type(&IType::Named(n.clone())),
        }
    }

    /// Queues a type for emission and returns the name it is listed under.
    fn use_type(&mut self, t: &IType) -> String {
        let t = match t {
            IType::Named(n) if is_int(n) => IType::Named("int".into()),
            IType::Array(e) if matches!(&**e, IType::Named(n) if is_int(n)) => {
                IType::Array(Box::new(IType::Named("int".into())))
            }
            other => other.clone(),
        };
        if !self.queue.contains(&t) && !self.emitted.contains(&t) {
            self.queue.push(t.clone());
        }
        match &t {
            IType::Named(n) if BUILTINS.contains(&n.as_str()) && n != "QType" => n.clone(),
            IType::Array(e) => format!("[{}]", self.use_type(e)),
            _ => {
                let next = self.names.len().to_string();
                self.names.entry(t).or_insert(next).clone()
            }
        }
    }

    fn members_info(&mut self, ms: &[Member]) -> Vec<Value> {
        ms.iter()
            .map(|m| {
                let mut obj = Map::new();
                obj.insert("name".into(), json!(m.name));
                obj.insert("type".into(), json!(self.use_type(&IType::from_ref(&m.ty))));
                if m.optional {
                    obj.insert("default".into(), Value::Null);
                }
                add_features(&mut obj, &m.features);
                Value::Object(obj)
            })
            .collect()
    }

    fn emit(&mut self, t: IType) {
        self.emitted.push(t.clone());
        let name = self.use_type(&t);
        let mut obj = Map::new();
        match &t {
            IType::Array(e) => {
                let el = self.use_type(e);
                obj.insert("element-type".into(), json!(el));
                obj.insert("meta-type".into(), json!("array"));
            }
            IType::Implicit(owner, role) => {
                let ms = match self.schema.get(owner).map(|e| &e.kind) {
                    Some(Kind::Command {
                        args: Some(MembersRef::Inline(ms)),
                        ..
                    }) if *role == "arg" => ms.clone(),
                    Some(Kind::Event {
                        data: Some(MembersRef::Inline(ms)),
                        ..
                    }) if *role == "data" => ms.clone(),
                    Some(Kind::Union {
                        base: MembersRef::Inline(ms),
                        ..
                    }) if *role == "base" => ms.clone(),
                    _ => Vec::new(),
                };
                let members = self.members_info(&ms);
                obj.insert("members".into(), json!(members));
                obj.insert("meta-type".into(), json!("object"));
            }
            IType::Named(n) if n == EMPTY => {
                obj.insert("members".into(), json!([]));
                obj.insert("meta-type".into(), json!("object"));
            }
            IType::Named(n) if n == "QType" => {
                enum_info(
                    &mut obj,
                    QTYPE_VALUES.iter().map(|v| (v.to_string(), Vec::new())),
                );
            }
            IType::Named(n) if BUILTINS.contains(&n.as_str()) => {
                let json_type = match n.as_str() {
                    "str" => "string",
                    "number" => "number",
                    "bool" => "boolean",
                    "null" => "null",
                    "any" => "value",
                    _ => "int",
                };
                obj.insert("json-type".into(), json!(json_type));
                obj.insert("meta-type".into(), json!("builtin"));
            }
            IType::Named(n) => {
                let Some(e) = self.schema.get(n) else { return };
                let e = e.clone();
                match &e.kind {
                    Kind::Enum { values, .. } => {
                        enum_info(
                            &mut obj,
                            values.iter().map(|v| (v.name.clone(), v.features.clone())),
                        );
                    }
                    Kind::Struct { .. } => {
                        let members = self.members_info(&self.schema.struct_members(n));
                        obj.insert("members".into(), json!(members));
                        obj.insert("meta-type".into(), json!("object"));
                    }
                    Kind::Union {
                        base,
                        discriminator,
                        variants,
                    } => {
                        let base_members = self.schema.members_of(base);
                        let members = self.members_info(&base_members);
                        let tag_ty = base_members
                            .iter()
                            .find(|m| &m.name == discriminator)
                            .map(|m| m.ty.element().to_owned())
                            .unwrap_or_default();
                        let mut vs = Vec::new();
                        for value in self.schema.enum_values(&tag_ty).unwrap_or_default() {
                            let ty = variants
                                .iter()
                                .find(|(v, _)| *v == value)
                                .map(|(_, t)| t.clone())
                                .unwrap_or_else(|| EMPTY.to_owned());
                            let tn = self.use_type(&IType::Named(ty));
                            vs.push(json!({"case": value, "type": tn}));
                        }
                        obj.insert("members".into(), json!(members));
                        obj.insert("tag".into(), json!(discriminator));
                        obj.insert("variants".into(), json!(vs));
                        obj.insert("meta-type".into(), json!("object"));
                    }
                    Kind::Alternate { variants } => {
                        let ms: Vec<Value> = variants
                            .iter()
                            .map(|(_, t)| json!({"type": self.use_type(&IType::from_ref(t))}))
                            .collect();
                        obj.insert("members".into(), json!(ms));
                        obj.insert("meta-type".into(), json!("alternate"));
                    }
                    Kind::Command { .. } | Kind::Event { .. } => return,
                }
                add_features(&mut obj, &e.features);
            }
        }
        let mut full = Map::new();
        full.insert("name".into(), json!(name));
        full.extend(obj);
        self.out.push(Value::Object(full));
    }
}

fn enum_info(obj: &mut Map<String, Value>, values: impl Iterator<Item = (String, Vec<String>)>) {
    let values: Vec<(String, Vec<String>)> = values.collect();
    let members: Vec<Value> = values
        .iter()
        .map(|(v, f)| {
            let mut m = Map::new();
            m.insert("name".into(), json!(v));
            add_features(&mut m, f);
            Value::Object(m)
        })
        .collect();
    obj.insert("members".into(), json!(members));
    obj.insert(
        "values".into(),
        json!(values.iter().map(|(v, _)| v).collect::<Vec<_>>()),
    );
    obj.insert("meta-type".into(), json!("enum"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_str;
    use std::path::Path;

    #[test]
    fn lists_commands_events_and_used_types_only() {
        let s = Schema::from_exprs(
            parse_str(
                "{ 'enum': 'K', 'data': ['a', 'b'] }\n\
                 { 'struct': 'A', 'data': { 'n': 'uint8', '*l': ['size'] } }\n\
                 { 'struct': 'Unused', 'data': { 'x': 'str' } }\n\
                 { 'union': 'U', 'base': { 'k': 'K' }, 'discriminator': 'k', 'data': { 'a': 'A' } }\n\
                 { 'command': 'c', 'data': { 'u': 'U' }, 'returns': ['A'], 'allow-oob': true }\n\
                 { 'event': 'E' }\n",
                Path::new("t.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let info = schema_info(&s);
        let by_name = |n: &str| info.iter().find(|v| v["name"] == n).cloned().unwrap();
        let c = by_name("c");
        assert_eq!(c["meta-type"], "command");
        assert_eq!(c["allow-oob"], true);
        let args = by_name(c["arg-type"].as_str().unwrap());
        assert_eq!(args["members"][0]["name"], "u");
        let u = by_name(args["members"][0]["type"].as_str().unwrap());
        assert_eq!(u["tag"], "k");
        assert_eq!(
            u["variants"].as_array().unwrap().len(),
            2,
            "b gets the empty branch"
        );
        let ret = by_name(c["ret-type"].as_str().unwrap());
        assert_eq!(ret["meta-type"], "array");
        let a = by_name(ret["element-type"].as_str().unwrap());
        assert_eq!(a["members"][0]["type"], "int", "uint8 is listed as int");
        assert_eq!(a["members"][1]["type"], "[int]");
        assert_eq!(a["members"][1]["default"], Value::Null);
        assert_eq!(by_name("E")["meta-type"], "event");
        assert!(!info.iter().any(|v| v.to_string().contains("Unused")));
        assert!(
            info.iter().all(|v| v["name"] != "A"),
            "type names are masked"
        );
    }
}
