//! The hand-written support the generated code stands on: the encoding and
//! decoding traits, the decoder that words errors exactly as QEMU does, and
//! the unit types `Empty` and `Null`.

use serde_json::{Map, Value};

/// A JSON object as QMP carries it.
pub type Object = Map<String, Value>;

/// An error decoding a value, worded as QEMU words it (`Parameter 'x' is
/// missing`, `Invalid parameter type for 'size', expected: integer`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl From<DecodeError> for qmp_proto::QmpError {
    fn from(e: DecodeError) -> Self {
        qmp_proto::QmpError::generic(e.0)
    }
}

/// A QAPI type: encodes to and decodes from a JSON value.
pub trait QapiType: Sized {
    /// Encodes the value as QMP sends it.
    fn to_qmp(&self) -> Value;
    /// Decodes a value; `d` decides strict (server) or lenient (client) rules
    /// and tracks the member path for error messages.
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError>;

    /// Decodes with QEMU's strict rules (unknown members and values refused).
    fn from_qmp_strict(v: Value) -> Result<Self, DecodeError> {
        Self::from_qmp(v, &mut Decoder::strict())
    }

    /// Decodes tolerantly, as a client of a possibly newer server should:
    /// unknown members are ignored and unknown enum values kept.
    fn from_qmp_lenient(v: Value) -> Result<Self, DecodeError> {
        Self::from_qmp(v, &mut Decoder::lenient())
    }
}

/// A type made of object members (structs and flat unions), so that unions
/// can decode their base and branch members from one object.
pub trait Members: Sized {
    /// Inserts the members into `m`.
    fn encode_members(&self, m: &mut Object);
    /// Takes the members out of `m`, leaving any others.
    fn decode_members(m: &mut Object, d: &mut Decoder) -> Result<Self, DecodeError>;
}

#[derive(Debug, Clone)]
enum Segment {
    Name(String),
    Index(usize),
}

/// Decoding state: strict or lenient, and the path to the value being
/// decoded (for QEMU's `file.filename` and `children[0].driver` names).
#[derive(Debug, Clone)]
pub struct Decoder {
    strict: bool,
    path: Vec<Segment>,
}

impl Decoder {
    /// A decoder with QEMU's server-side rules.
    pub fn strict() -> Self {
        Decoder {
            strict: true,
            path: Vec::new(),
        }
    }

    /// A decoder for replies and events from a possibly newer server.
    pub fn lenient() -> Self {
        Decoder {
            strict: false,
            path: Vec::new(),
        }
    }

    /// Whether unknown members and values are errors.
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// QEMU's full name of the current value, or of its member `name`.
    fn full_name(&self, member: Option<&str>) -> String {
        let mut s = String::new();
        for seg in self
            .path
            .iter()
            .map(|s| match s {
                Segment::Name(n) => Segment::Name(n.clone()),
                Segment::Index(i) => Segment::Index(*i),
            })
            .chain(member.map(|m| Segment::Name(m.to_owned())))
        {
            match seg {
                Segment::Name(n) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(&n);
                }
                Segment::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        if s.is_empty() {
            "<anonymous>".to_owned()
        } else {
            s
        }
    }

    /// The bare name QEMU uses in some messages: the member's own name, or
    /// `null` for a list element.
    fn bare_name(&self) -> String {
        match self.path.last() {
            Some(Segment::Name(n)) => n.clone(),
            _ => "null".to_owned(),
        }
    }

    /// `Invalid parameter type for 'x', expected: <what>`.
    pub fn invalid_type(&self, expected: &str) -> DecodeError {
        DecodeError(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full_name(None)
        ))
    }

    /// `Parameter 'x' expects <what>`, with the full name.
    pub fn expects(&self, what: &str) -> DecodeError {
        DecodeError(format!(
            "Parameter '{}' expects {what}",
            self.full_name(None)
        ))
    }

    /// `Parameter 'x' expects <what>`, with the bare name (range checks).
    pub fn out_of_range(&self, what: &str) -> DecodeError {
        DecodeError(format!("Parameter '{}' expects {what}", self.bare_name()))
    }

    /// `Parameter 'x' does not accept value 'v'`.
    pub fn bad_enum_value(&self, value: &str) -> DecodeError {
        DecodeError(format!(
            "Parameter '{}' does not accept value '{value}'",
            self.bare_name()
        ))
    }

    /// An alternate received a JSON type none of its branches takes.
    pub fn bad_alternate(&self, alternate: &str) -> DecodeError {
        DecodeError(format!(
            "Invalid parameter type for '{}', expected: {alternate}",
            self.bare_name()
        ))
    }

    /// Takes the object out of a value.
    pub fn object(&self, v: Value) -> Result<Object, DecodeError> {
        match v {
            Value::Object(m) => Ok(m),
            _ => Err(self.invalid_type("object")),
        }
    }

    /// Takes the string out of a value.
    pub fn string(&self, v: Value) -> Result<String, DecodeError> {
        match v {
            Value::String(s) => Ok(s),
            _ => Err(self.invalid_type("string")),
        }
    }

    fn nested<T>(
        &mut self,
        seg: Segment,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        self.path.push(seg);
        let r = f(self);
        self.path.pop();
        r
    }

    /// Decodes the required member `name` of `m`.
    pub fn member<T: QapiType>(&mut self, m: &mut Object, name: &str) -> Result<T, DecodeError> {
        match m.remove(name) {
            Some(v) => self.nested(Segment::Name(name.to_owned()), |d| T::from_qmp(v, d)),
            None => Err(DecodeError(format!(
                "Parameter '{}' is missing",
                self.full_name(Some(name))
            ))),
        }
    }

    /// Decodes the optional member `name` of `m`.
    pub fn optional<T: QapiType>(
        &mut self,
        m: &mut Object,
        name: &str,
    ) -> Result<Option<T>, DecodeError> {
        match m.remove(name) {
            Some(v) => self
                .nested(Segment::Name(name.to_owned()), |d| T::from_qmp(v, d))
                .map(Some),
            None => Ok(None),
        }
    }

    /// Ends an object: in strict mode, a member nobody took is an error.
    pub fn finish(&self, m: Object) -> Result<(), DecodeError> {
        match m.keys().next() {
            Some(k) if self.strict => Err(DecodeError(format!(
                "Parameter '{}' is unexpected",
                self.full_name(Some(k))
            ))),
            _ => Ok(()),
        }
    }
}

/// The JSON kind of a value, as the generated alternate decoders name them.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Implements serde's traits for a generated type through [`QapiType`]
/// (serialization encodes; deserialization decodes leniently).
#[macro_export]
#[doc(hidden)]
macro_rules! impl_serde {
    ($t:ty) => {
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(
                &self,
                s: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                ::serde::Serialize::serialize(&$crate::runtime::QapiType::to_qmp(self), s)
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                d: D,
            ) -> ::std::result::Result<Self, D::Error> {
                let v = <::serde_json::Value as ::serde::Deserialize>::deserialize(d)?;
                <$t as $crate::runtime::QapiType>::from_qmp_lenient(v)
                    .map_err(<D::Error as ::serde::de::Error>::custom)
            }
        }
    };
}
pub use impl_serde;

/// Implements [`QapiType`] and serde for a type that implements [`Members`].
#[macro_export]
#[doc(hidden)]
macro_rules! impl_object {
    ($t:ty) => {
        impl $crate::runtime::QapiType for $t {
            fn to_qmp(&self) -> ::serde_json::Value {
                let mut m = ::serde_json::Map::new();
                $crate::runtime::Members::encode_members(self, &mut m);
                ::serde_json::Value::Object(m)
            }
            fn from_qmp(
                v: ::serde_json::Value,
                d: &mut $crate::runtime::Decoder,
            ) -> ::std::result::Result<Self, $crate::runtime::DecodeError> {
                let mut m = d.object(v)?;
                let r = <$t as $crate::runtime::Members>::decode_members(&mut m, d)?;
                d.finish(m)?;
                Ok(r)
            }
        }
        $crate::runtime::impl_serde!($t);
    };
}
pub use impl_object;

/// The empty object: the arguments of a command that takes none, and the
/// return value of a command that returns nothing (`{}` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Empty;

impl Members for Empty {
    fn encode_members(&self, _m: &mut Object) {}
    fn decode_members(_m: &mut Object, _d: &mut Decoder) -> Result<Self, DecodeError> {
        Ok(Empty)
    }
}
impl_object!(Empty);

/// The JSON `null` (QAPI's built-in type `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Null;

impl QapiType for Null {
    fn to_qmp(&self) -> Value {
        Value::Null
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        match v {
            Value::Null => Ok(Null),
            _ => Err(d.invalid_type("null")),
        }
    }
}
impl_serde!(Null);

/// The unit return of commands without `returns`: encodes as `{}` and
/// accepts any object.
impl QapiType for () {
    fn to_qmp(&self) -> Value {
        Value::Object(Map::new())
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        d.object(v).map(|_| ())
    }
}

impl QapiType for String {
    fn to_qmp(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        d.string(v)
    }
}

impl QapiType for bool {
    fn to_qmp(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        match v {
            Value::Bool(b) => Ok(b),
            _ => Err(d.invalid_type("boolean")),
        }
    }
}

impl QapiType for f64 {
    fn to_qmp(&self) -> Value {
        serde_json::Number::from_f64(*self).map_or(Value::Null, Value::Number)
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        match v.as_f64() {
            Some(f) if v.is_number() => Ok(f),
            _ => Err(d.invalid_type("number")),
        }
    }
}

impl QapiType for i64 {
    fn to_qmp(&self) -> Value {
        Value::from(*self)
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        v.as_i64().ok_or_else(|| d.invalid_type("integer"))
    }
}

/// QEMU's uint64 (and `size`) input: a non-negative integer, or a negative
/// one taken modulo 2^64 for backward compatibility.
fn uint64(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_i64().map(|i| i as u64))
}

impl QapiType for u64 {
    fn to_qmp(&self) -> Value {
        Value::from(*self)
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        uint64(&v).ok_or_else(|| d.expects("uint64"))
    }
}

macro_rules! ranged_int {
    ($($t:ty => $wide:ident, $name:literal;)*) => {$(
        impl QapiType for $t {
            fn to_qmp(&self) -> Value {
                Value::from(*self)
            }
            fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
                let wide = ranged_int!(@wide $wide, v, d)?;
                <$t>::try_from(wide).map_err(|_| d.out_of_range($name))
            }
        }
    )*};
    (@wide signed, $v:ident, $d:ident) => { $v.as_i64().ok_or_else(|| $d.invalid_type("integer")) };
    (@wide unsigned, $v:ident, $d:ident) => { uint64(&$v).ok_or_else(|| $d.expects("uint64")) };
}

ranged_int! {
    i8 => signed, "int8_t";
    i16 => signed, "int16_t";
    i32 => signed, "int32_t";
    u8 => unsigned, "uint8_t";
    u16 => unsigned, "uint16_t";
    u32 => unsigned, "uint32_t";
}

impl QapiType for Value {
    fn to_qmp(&self) -> Value {
        self.clone()
    }
    fn from_qmp(v: Value, _d: &mut Decoder) -> Result<Self, DecodeError> {
        Ok(v)
    }
}

impl<T: QapiType> QapiType for Vec<T> {
    fn to_qmp(&self) -> Value {
        Value::Array(self.iter().map(QapiType::to_qmp).collect())
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        match v {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| d.nested(Segment::Index(i), |d| T::from_qmp(item, d)))
                .collect(),
            _ => Err(d.invalid_type("array")),
        }
    }
}

impl<T: QapiType> QapiType for Box<T> {
    fn to_qmp(&self) -> Value {
        (**self).to_qmp()
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        T::from_qmp(v, d).map(Box::new)
    }
}

/// QAPI's built-in enum `QType`: the JSON type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// No value.
    None,
    /// `null`.
    Qnull,
    /// A number.
    Qnum,
    /// A string.
    Qstring,
    /// An object.
    Qdict,
    /// An array.
    Qlist,
    /// A boolean.
    Qbool,
}

impl QType {
    const NAMES: [(QType, &'static str); 7] = [
        (QType::None, "none"),
        (QType::Qnull, "qnull"),
        (QType::Qnum, "qnum"),
        (QType::Qstring, "qstring"),
        (QType::Qdict, "qdict"),
        (QType::Qlist, "qlist"),
        (QType::Qbool, "qbool"),
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(q, _)| *q == self)
            .map_or("none", |(_, n)| n)
    }
}

impl QapiType for QType {
    fn to_qmp(&self) -> Value {
        Value::String(self.as_str().to_owned())
    }
    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        let s = d.string(v)?;
        QType::NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(q, _)| *q)
            .ok_or_else(|| d.bad_enum_value(&s))
    }
}
impl_serde!(QType);

/// What the dispatcher needs to know of a command, implemented by the
/// generated marker types in [`crate::cmd`].
pub trait CommandSpec: 'static {
    /// The wire name.
    const NAME: &'static str;
    /// The decoded arguments.
    type Args: QapiType;
    /// The handler's return value (`()` for commands without `returns`).
    type Ret: QapiType;
    /// Whether `exec-oob` may run the command.
    const ALLOW_OOB: bool;
    /// The schema module (command group) that defines it.
    const GROUP: &'static str;
    /// Whether the command is deprecated.
    const DEPRECATED: bool;
}

pub use crate::dispatch::Dispatcher;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_follow_qemu() {
        let mut d = Decoder::strict();
        assert_eq!(u64::from_qmp(json!(-1), &mut d), Ok(u64::MAX));
        assert_eq!(
            u64::from_qmp(json!("x"), &mut d).unwrap_err().0,
            "Parameter '<anonymous>' expects uint64"
        );
        assert_eq!(
            u32::from_qmp(json!(5_000_000_000u64), &mut d)
                .unwrap_err()
                .0,
            "Parameter 'null' expects uint32_t"
        );
        assert_eq!(i8::from_qmp(json!(-128), &mut d), Ok(-128));
        assert!(i64::from_qmp(json!(1.5), &mut d).is_err());
        assert_eq!(f64::from_qmp(json!(2), &mut d), Ok(2.0));
    }

    #[test]
    fn paths_name_members_and_indexes() {
        let mut d = Decoder::strict();
        let mut m = json!({"children": [{"x": 1}, {"y": 2}]})
            .as_object()
            .unwrap()
            .clone();
        // Decode `children` as a list of objects requiring `x`.
        #[derive(Debug)]
        struct X;
        impl QapiType for X {
            fn to_qmp(&self) -> Value {
                Value::Null
            }
            fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
                let mut m = d.object(v)?;
                let _: i64 = d.member(&mut m, "x")?;
                d.finish(m)?;
                Ok(X)
            }
        }
        let err = d.member::<Vec<X>>(&mut m, "children").unwrap_err();
        assert_eq!(err.0, "Parameter 'children[1].x' is missing");
    }
}
