//! Emission of the Rust types of a schema: enums, structs, flat unions and
//! alternates, each with its encoding and its decoding.
//!
//! The generated code relies on the runtime of `qapi-types`
//! (`crate::runtime`): the `QapiType` and `Members` traits, the `Decoder`
//! that produces QEMU's error messages, and `impl_serde!`.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::naming::{camel, field, type_ident};
use crate::parser::Doc;
use crate::schema::{Entity, Kind, Member, MembersRef, Schema, TypeRef, BUILTINS};

/// Code generation context shared by the emitters.
pub struct Gen<'a> {
    /// The schema being generated.
    pub schema: &'a Schema,
    defaultable: HashSet<String>,
    /// `(owner, member or alternate branch)` pairs held in a `Box` to give
    /// recursive types a finite size.
    boxed: HashSet<(String, String)>,
}

/// A by-value containment in the generated Rust types.
struct Edge {
    owner: String,
    label: String,
    target: String,
    /// Union branches are enum payloads and are never boxed.
    boxable: bool,
    /// Lower is boxed first when a cycle must be broken.
    rank: u8,
}

impl<'a> Gen<'a> {
    /// Prepares generation for a checked schema.
    pub fn new(schema: &'a Schema) -> Self {
        let mut g = Gen {
            schema,
            defaultable: HashSet::new(),
            boxed: HashSet::new(),
        };
        g.boxed = choose_boxes(&g.edges());
        // A struct derives Default when every required member's type has a default.
        loop {
            let mut changed = false;
            for e in &schema.entities {
                if matches!(e.kind, Kind::Struct { .. }) && !g.defaultable.contains(&e.name) {
                    let ok = schema
                        .struct_members(&e.name)
                        .iter()
                        .all(|m| m.optional || g.type_has_default(&m.ty));
                    if ok {
                        g.defaultable.insert(e.name.clone());
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        g
    }

    fn type_has_default(&self, t: &TypeRef) -> bool {
        match t {
            TypeRef::Array(_) => true,
            TypeRef::Named(n) => {
                (BUILTINS.contains(&n.as_str()) && n != "QType") || self.defaultable.contains(n)
            }
        }
    }

    /// Whether members may be built with `..Default::default()`.
    pub fn members_default(&self, members: &[Member]) -> bool {
        members
            .iter()
            .all(|m| m.optional || self.type_has_default(&m.ty))
    }

    /// The Rust type of a schema type reference.
    pub fn rust_type(&self, t: &TypeRef) -> TokenStream {
        match t {
            TypeRef::Named(n) => self.named_type(n),
            TypeRef::Array(n) => {
                let inner = self.named_type(n);
                quote!(::std::vec::Vec<#inner>)
            }
        }
    }

    fn named_type(&self, n: &str) -> TokenStream {
        match n {
            "str" => quote!(::std::string::String),
            "int" | "int64" => quote!(i64),
            "int8" => quote!(i8),
            "int16" => quote!(i16),
            "int32" => quote!(i32),
            "uint8" => quote!(u8),
            "uint16" => quote!(u16),
            "uint32" => quote!(u32),
            "uint64" | "size" => quote!(u64),
            "number" => quote!(f64),
            "bool" => quote!(bool),
            "null" => quote!(crate::runtime::Null),
            "any" => quote!(::serde_json::Value),
            "QType" => quote!(crate::runtime::QType),
            other => {
                let id = type_ident(other);
                quote!(crate::types::#id)
            }
        }
    }

    /// The Rust type of a member of `owner`, boxed where a cycle of
    /// recursive types is broken, wrapped in `Option` when optional.
    pub fn member_type(&self, owner: &str, m: &Member) -> TokenStream {
        let mut ty = self.rust_type(&m.ty);
        if self.boxed.contains(&(owner.to_owned(), m.name.clone())) {
            ty = quote!(::std::boxed::Box<#ty>);
        }
        if m.optional {
            quote!(::std::option::Option<#ty>)
        } else {
            ty
        }
    }

    /// Every by-value containment between the schema's complex types.
    fn edges(&self) -> Vec<Edge> {
        let complex = |n: &str| {
            matches!(
                self.schema.get(n).map(|e| &e.kind),
                Some(Kind::Struct { .. } | Kind::Union { .. } | Kind::Alternate { .. })
            )
        };
        let member_edges = |owner: &str, ms: Vec<Member>, out: &mut Vec<Edge>| {
            for m in ms {
                if let TypeRef::Named(n) = &m.ty {
                    if complex(n) {
                        out.push(Edge {
                            owner: owner.to_owned(),
                            label: m.name.clone(),
                            target: n.clone(),
                            boxable: true,
                            rank: if m.optional { 1 } else { 2 },
                        });
                    }
                }
            }
        };
        let mut out = Vec::new();
        for e in &self.schema.entities {
            match &e.kind {
                Kind::Struct { .. } => {
                    member_edges(&e.name, self.schema.struct_members(&e.name), &mut out)
                }
                Kind::Union { base, variants, .. } => {
                    member_edges(&e.name, self.schema.members_of(base), &mut out);
                    for (value, ty) in variants {
                        out.push(Edge {
                            owner: e.name.clone(),
                            label: value.clone(),
                            target: ty.clone(),
                            boxable: false,
                            rank: 3,
                        });
                    }
                }
                Kind::Alternate { variants } => {
                    for (name, ty) in variants {
                        if let TypeRef::Named(n) = ty {
                            if complex(n) {
                                out.push(Edge {
                                    owner: e.name.clone(),
                                    label: name.clone(),
                                    target: n.clone(),
                                    boxable: true,
                                    rank: 0,
                                });
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Emits one type definition (enums, structs, unions, alternates).
    pub fn type_def(&self, e: &Entity) -> TokenStream {
        match &e.kind {
            Kind::Enum { values, .. } => self.enum_def(e, values),
            Kind::Struct { .. } => {
                let members = self.schema.struct_members(&e.name);
                self.struct_def(&e.name, &doc_text(e), e.doc.as_ref(), &members)
            }
            Kind::Union {
                base,
                discriminator,
                variants,
            } => self.union_def(e, base, discriminator, variants),
            Kind::Alternate { variants } => self.alternate_def(e, variants),
            Kind::Command { .. } | Kind::Event { .. } => TokenStream::new(),
        }
    }

    fn enum_def(&self, e: &Entity, values: &[crate::schema::EnumValue]) -> TokenStream {
        let name = type_ident(&e.name);
        let doc = doc_text(e);
        let variants: Vec<_> = values
            .iter()
            .map(|v| format_ident!("{}", camel(&v.name)))
            .collect();
        let wire: Vec<_> = values.iter().map(|v| v.name.as_str()).collect();
        let vdocs: Vec<String> = values
            .iter()
            .map(|v| {
                let mut d = e
                    .doc
                    .as_ref()
                    .and_then(|d| d.member(&v.name))
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("The value `{}`.", v.name));
                if v.features.iter().any(|f| f == "deprecated") {
                    d.push_str("\n\nDeprecated.");
                }
                d
            })
            .collect();
        quote! {
            #[doc = #doc]
            #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
            pub enum #name {
                #( #[doc = #vdocs] #variants, )*
                /// A value this version does not know, kept as sent. Only decoding a newer
                /// peer's message in lenient mode produces it; strict decoding refuses it.
                Unrecognized(::std::string::String),
            }

            impl #name {
                /// The wire names of the known values, in schema order.
                pub const VALUES: &'static [&'static str] = &[#(#wire),*];

                /// The wire name of the value.
                pub fn as_str(&self) -> &str {
                    match self {
                        #( Self::#variants => #wire, )*
                        Self::Unrecognized(s) => s,
                    }
                }

                /// The known value with this wire name.
                pub fn from_wire(s: &str) -> ::std::option::Option<Self> {
                    match s {
                        #( #wire => Some(Self::#variants), )*
                        _ => None,
                    }
                }
            }

            impl ::std::fmt::Display for #name {
                fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                    f.write_str(self.as_str())
                }
            }

            impl crate::runtime::QapiType for #name {
                fn to_qmp(&self) -> ::serde_json::Value {
                    ::serde_json::Value::String(self.as_str().to_owned())
                }
                fn from_qmp(
                    v: ::serde_json::Value,
                    d: &mut crate::runtime::Decoder,
                ) -> ::std::result::Result<Self, crate::runtime::DecodeError> {
                    let s = d.string(v)?;
                    match Self::from_wire(&s) {
                        Some(x) => Ok(x),
                        None if !d.is_strict() => Ok(Self::Unrecognized(s)),
                        None => Err(d.bad_enum_value(&s)),
                    }
                }
            }
            crate::runtime::impl_serde!(#name);
        }
    }

    /// Emits a struct with the given (already flattened) members.
    pub fn struct_def(
        &self,
        owner: &str,
        doc: &str,
        edoc: Option<&Doc>,
        members: &[Member],
    ) -> TokenStream {
        let name = type_ident(owner);
        let fields = self.fields(owner, edoc, members);
        let derive_default = if self.members_default(members) {
            quote!(Default,)
        } else {
            quote!()
        };
        let encode = encode_members(members);
        let (decode_stmts, field_names) = decode_members(members);
        quote! {
            #[doc = #doc]
            #[derive(Debug, Clone, PartialEq, #derive_default)]
            pub struct #name { #fields }

            impl crate::runtime::Members for #name {
                #[allow(unused_variables)]
                fn encode_members(&self, m: &mut ::serde_json::Map<::std::string::String, ::serde_json::Value>) {
                    #encode
                }
                #[allow(unused_variables)]
                fn decode_members(
                    m: &mut ::serde_json::Map<::std::string::String, ::serde_json::Value>,
                    d: &mut crate::runtime::Decoder,
                ) -> ::std::result::Result<Self, crate::runtime::DecodeError> {
                    #decode_stmts
                    Ok(Self { #(#field_names),* })
                }
            }
            crate::runtime::impl_object!(#name);
        }
    }

    fn fields(&self, owner: &str, doc: Option<&Doc>, members: &[Member]) -> TokenStream {
        let mut out = TokenStream::new();
        for m in members {
            let f = field(&m.name);
            let ty = self.member_type(owner, m);
            let mdoc = member_doc(doc, m);
            out.extend(quote!(#[doc = #mdoc] pub #f: #ty,));
        }
        out
    }

    fn union_def(
        &self,
        e: &Entity,
        base: &MembersRef,
        discriminator: &str,
        variants: &[(String, String)],
    ) -> TokenStream {
        let name = type_ident(&e.name);
        let branch_name = format_ident!("{}Branch", camel(&e.name));
        let doc = doc_text(e);
        let base_members = self.schema.members_of(base);
        let disc = base_members
            .iter()
            .find(|m| m.name == discriminator)
            .expect("checked: discriminator is a base member");
        let disc_ty_name = disc.ty.element().to_owned();
        let disc_ty = self.rust_type(&disc.ty);
        let disc_field = field(discriminator);
        let values = self.schema.enum_values(&disc_ty_name).unwrap_or_default();
        let others: Vec<Member> = base_members
            .iter()
            .filter(|m| m.name != discriminator)
            .cloned()
            .collect();
        let fields = self.fields(&e.name, e.doc.as_ref(), &others);

        let mut branch_variants = TokenStream::new();
        let mut discriminant_arms = TokenStream::new();
        let mut decode_arms = TokenStream::new();
        let mut encode_arms = TokenStream::new();
        for value in &values {
            let v = format_ident!("{}", camel(value));
            let branch = variants.iter().find(|(val, _)| val == value);
            match branch {
                Some((_, ty)) => {
                    let bty = self.rust_type(&TypeRef::Named(ty.clone()));
                    let vdoc = format!("Branch for `{discriminator}` = `{value}`.");
                    branch_variants.extend(quote!(#[doc = #vdoc] #v(#bty),));
                    discriminant_arms.extend(quote!(Self::#v(_) => #disc_ty::#v,));
                    decode_arms.extend(quote! {
                        #disc_ty::#v => #branch_name::#v(crate::runtime::Members::decode_members(m, d)?),
                    });
                    encode_arms.extend(quote!(#branch_name::#v(b) => crate::runtime::Members::encode_members(b, m),));
                }
                None => {
                    let vdoc =
                        format!("`{discriminator}` = `{value}`, which has no further members.");
                    branch_variants.extend(quote!(#[doc = #vdoc] #v,));
                    discriminant_arms.extend(quote!(Self::#v => #disc_ty::#v,));
                    decode_arms.extend(quote!(#disc_ty::#v => #branch_name::#v,));
                    encode_arms.extend(quote!(#branch_name::#v => {}));
                }
            }
        }
        let disc_doc = member_doc(e.doc.as_ref(), disc);
        let branch_doc = format!(
            "The branches of [`{}`], selected by its `{discriminator}` member.",
            camel(&e.name)
        );

        // Encoding and decoding walk the base members in schema order; the
        // discriminator is read where it stands, then the branch's members.
        let mut encode = TokenStream::new();
        let mut decode = TokenStream::new();
        let mut names = Vec::new();
        for m in &base_members {
            if m.name == discriminator {
                let wire = m.name.as_str();
                encode.extend(quote! {
                    m.insert(#wire.to_owned(), crate::runtime::QapiType::to_qmp(&self.#disc_field.discriminant()));
                });
                decode.extend(quote!(let discriminant: #disc_ty = d.member(m, #wire)?;));
            } else {
                encode.extend(encode_member(m));
                let (stmt, f) = decode_member(m);
                decode.extend(stmt);
                names.push(f);
            }
        }
        quote! {
            #[doc = #doc]
            #[derive(Debug, Clone, PartialEq)]
            pub struct #name {
                #fields
                #[doc = #disc_doc]
                pub #disc_field: #branch_name,
            }

            #[doc = #branch_doc]
            #[derive(Debug, Clone, PartialEq)]
            pub enum #branch_name {
                #branch_variants
                /// A discriminator value this version does not know (lenient decoding only);
                /// the branch's members are not kept.
                Unrecognized(::std::string::String),
            }

            impl #branch_name {
                /// The discriminator value of this branch.
                pub fn discriminant(&self) -> #disc_ty {
                    match self {
                        #discriminant_arms
                        Self::Unrecognized(s) => #disc_ty::Unrecognized(s.clone()),
                    }
                }
            }

            impl crate::runtime::Members for #name {
                fn encode_members(&self, m: &mut ::serde_json::Map<::std::string::String, ::serde_json::Value>) {
                    #encode
                    match &self.#disc_field {
                        #encode_arms
                        #branch_name::Unrecognized(_) => {}
                    }
                }
                fn decode_members(
                    m: &mut ::serde_json::Map<::std::string::String, ::serde_json::Value>,
                    d: &mut crate::runtime::Decoder,
                ) -> ::std::result::Result<Self, crate::runtime::DecodeError> {
                    #decode
                    let #disc_field = match discriminant {
                        #decode_arms
                        #disc_ty::Unrecognized(s) => {
                            // Lenient decoding keeps going without the branch's members.
                            m.clear();
                            #branch_name::Unrecognized(s)
                        }
                    };
                    Ok(Self { #(#names,)* #disc_field })
                }
            }
            crate::runtime::impl_object!(#name);
        }
    }

    fn alternate_def(&self, e: &Entity, variants: &[(String, TypeRef)]) -> TokenStream {
        let name = type_ident(&e.name);
        let doc = doc_text(e);
        let wire_name = e.name.as_str();
        let mut vdefs = TokenStream::new();
        let mut encode_arms = TokenStream::new();
        let mut decode_arms = TokenStream::new();
        for (bname, ty) in variants {
            let v = format_ident!("{}", camel(bname));
            let mut rty = self.rust_type(ty);
            if self.boxed.contains(&(e.name.clone(), bname.clone())) {
                rty = quote!(::std::boxed::Box<#rty>);
            }
            let vdoc = e
                .doc
                .as_ref()
                .and_then(|d| d.member(bname))
                .map(str::to_owned)
                .unwrap_or_else(|| format!("The `{bname}` branch."));
            vdefs.extend(quote!(#[doc = #vdoc] #v(#rty),));
            encode_arms.extend(quote!(Self::#v(x) => crate::runtime::QapiType::to_qmp(x),));
            for kind in self.schema.json_kinds(ty) {
                decode_arms.extend(quote! {
                    #kind => Ok(Self::#v(crate::runtime::QapiType::from_qmp(v, d)?)),
                });
            }
        }
        quote! {
            #[doc = #doc]
            #[derive(Debug, Clone, PartialEq)]
            pub enum #name { #vdefs }

            impl crate::runtime::QapiType for #name {
                fn to_qmp(&self) -> ::serde_json::Value {
                    match self { #encode_arms }
                }
                fn from_qmp(
                    v: ::serde_json::Value,
                    d: &mut crate::runtime::Decoder,
                ) -> ::std::result::Result<Self, crate::runtime::DecodeError> {
                    match crate::runtime::json_kind(&v) {
                        #decode_arms
                        _ => Err(d.bad_alternate(#wire_name)),
                    }
                }
            }
            crate::runtime::impl_serde!(#name);
        }
    }
}

/// Chooses the containments to box so that every cycle of by-value
/// containment is broken once, where it is cheapest to read: alternate
/// branches first (QEMU's `BlockdevRef`), then optional members, then
/// required ones. An edge is boxed only if its target still reaches its
/// owner through edges not boxed yet.
fn choose_boxes(edges: &[Edge]) -> HashSet<(String, String)> {
    let mut boxed: HashSet<(String, String)> = HashSet::new();
    let mut order: Vec<&Edge> = edges.iter().filter(|e| e.boxable).collect();
    order.sort_by_key(|e| e.rank);
    for e in order {
        let mut stack = vec![e.target.as_str()];
        let mut seen = HashSet::new();
        let mut reaches_owner = false;
        while let Some(n) = stack.pop() {
            if n == e.owner {
                reaches_owner = true;
                break;
            }
            if seen.insert(n) {
                stack.extend(
                    edges
                        .iter()
                        .filter(|x| {
                            x.owner == n && !boxed.contains(&(x.owner.clone(), x.label.clone()))
                        })
                        .map(|x| x.target.as_str()),
                );
            }
        }
        if reaches_owner {
            boxed.insert((e.owner.clone(), e.label.clone()));
        }
    }
    boxed
}

/// Statements encoding members into the map `m` from `self`.
pub fn encode_members(members: &[Member]) -> TokenStream {
    members.iter().map(encode_member).collect()
}

fn encode_member(m: &Member) -> TokenStream {
    let f = field(&m.name);
    let wire = m.name.as_str();
    if m.optional {
        quote! {
            if let Some(x) = &self.#f {
                m.insert(#wire.to_owned(), crate::runtime::QapiType::to_qmp(x));
            }
        }
    } else {
        quote!(m.insert(#wire.to_owned(), crate::runtime::QapiType::to_qmp(&self.#f));)
    }
}

/// Statements decoding members from the map `m` with decoder `d`, in schema
/// order (so errors come in QEMU's order), and the field names they bind.
pub fn decode_members(members: &[Member]) -> (TokenStream, Vec<proc_macro2::Ident>) {
    let mut stmts = TokenStream::new();
    let mut names = Vec::new();
    for m in members {
        let (s, f) = decode_member(m);
        stmts.extend(s);
        names.push(f);
    }
    (stmts, names)
}

fn decode_member(m: &Member) -> (TokenStream, proc_macro2::Ident) {
    let f = field(&m.name);
    let wire = m.name.as_str();
    let stmt = if m.optional {
        quote!(let #f = d.optional(m, #wire)?;)
    } else {
        quote!(let #f = d.member(m, #wire)?;)
    };
    (stmt, f)
}

/// The doc text of a definition, with a note of its wire name and features.
pub fn doc_text(e: &Entity) -> String {
    let mut text = e
        .doc
        .as_ref()
        .map(|d| d.body.clone())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| format!("The QAPI {} `{}`.", e.meta(), e.name));
    text = escape_doc(&text);
    text.push_str(&format!(
        "\n\nQAPI {} `{}` (schema module `{}`).",
        e.meta(),
        e.name,
        e.module
    ));
    if !e.features.is_empty() {
        text.push_str(&format!(" Features: {}.", e.features.join(", ")));
    }
    text
}

/// The doc text of a member.
pub fn member_doc(doc: Option<&Doc>, m: &Member) -> String {
    let mut text = doc
        .and_then(|d| d.member(&m.name))
        .map(escape_doc)
        .unwrap_or_else(|| format!("The `{}` member.", m.name));
    text.push_str(&format!(" (wire name `{}`", m.name));
    if m.optional {
        text.push_str(", optional");
    }
    text.push(')');
    if m.features.iter().any(|f| f == "deprecated") {
        text.push_str("\n\nDeprecated.");
    }
    text
}

/// Makes schema prose safe for rustdoc: `@name` references become code, and
/// example blocks are fenced as text so they are not compiled as doctests.
fn escape_doc(s: &str) -> String {
    let mut out = String::new();
    let mut in_example = false;
    for line in s.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("Example") {
            if in_example {
                out.push_str("```\n");
            }
            out.push_str(line);
            out.push_str("\n\n```text\n");
            in_example = true;
            continue;
        }
        if in_example
            && (trimmed.starts_with("Since:")
                || trimmed.starts_with("Notes:")
                || trimmed.starts_with("Note:")
                || trimmed.starts_with("Returns:"))
        {
            out.push_str("```\n");
            in_example = false;
        }
        if in_example {
            out.push_str(line);
        } else {
            // Four spaces of indentation would make a Markdown code block,
            // which rustdoc compiles as a doctest; up to three keep list
            // continuations attached to their item.
            let indent = (line.len() - trimmed.len()).min(3);
            let mut l = " ".repeat(indent);
            let mut chars = trimmed.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '@' && chars.peek().is_some_and(|n| n.is_ascii_alphanumeric()) {
                    let mut word = String::new();
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '-' || n == '_' {
                            word.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    l.push_str(&format!("`{word}`"));
                } else if c == '[' || c == ']' {
                    l.push('\\');
                    l.push(c);
                } else if c == '<' || c == '>' {
                    l.push_str(if c == '<' { "&lt;" } else { "&gt;" });
                } else {
                    l.push(c);
                }
            }
            out.push_str(&l);
        }
        out.push('\n');
    }
    if in_example {
        out.push_str("```\n");
    }
    out.trim_end().to_owned()
}
