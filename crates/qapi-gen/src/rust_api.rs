//! Emission of commands, events, the per-group handler traits and their
//! registration with the dispatcher.

use std::collections::BTreeMap;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::naming::{camel, snake};
use crate::rust_types::{doc_text, Gen};
use crate::schema::{Entity, Kind, MembersRef, TypeRef};

/// Commands handled by the protocol session or by the dispatcher itself:
/// no handler trait carries them.
pub const BUILTIN_COMMANDS: &[&str] = &["qmp_capabilities", "query-commands", "query-qmp-schema"];

/// The Rust marker name of a command.
pub fn command_marker(name: &str) -> String {
    camel(name)
}

/// The Rust marker name of an event (`BLOCK_JOB_READY` -> `BlockJobReady`).
pub fn event_marker(name: &str) -> String {
    camel(&name.to_ascii_lowercase())
}

/// The Rust trait name of a command group (schema module).
pub fn group_trait(module: &str) -> String {
    format!("{}Commands", camel(module))
}

struct CommandTypes {
    /// Tokens of the argument type (a path).
    args: TokenStream,
    /// Whether the arguments are the empty object.
    no_args: bool,
    /// Tokens of the handler's return type.
    ret: TokenStream,
    /// Tokens of the wire return type (`Empty` for commands without `returns`).
    wire_ret: TokenStream,
}

impl Gen<'_> {
    fn command_types(&self, e: &Entity) -> CommandTypes {
        let Kind::Command { args, returns, .. } = &e.kind else {
            unreachable!("only commands")
        };
        let marker = command_marker(&e.name);
        let (args, no_args) = match args {
            None => (quote!(crate::runtime::Empty), true),
            Some(MembersRef::Inline(ms)) if ms.is_empty() => (quote!(crate::runtime::Empty), true),
            Some(MembersRef::Inline(_)) => {
                let id = format_ident!("{}Arguments", marker);
                (quote!(crate::cmd::#id), false)
            }
            Some(MembersRef::Named(n)) => (self.rust_type(&TypeRef::Named(n.clone())), false),
        };
        let (ret, wire_ret) = match returns {
            None => (quote!(()), quote!(crate::runtime::Empty)),
            Some(t) => {
                let t = self.rust_type(t);
                (t.clone(), t)
            }
        };
        CommandTypes {
            args,
            no_args,
            ret,
            wire_ret,
        }
    }

    /// The `cmd` module: a marker type per command and its inline argument structs.
    pub fn commands_module(&self) -> TokenStream {
        let mut items = TokenStream::new();
        let mut names = Vec::new();
        for e in &self.schema.entities {
            let Kind::Command {
                args, allow_oob, ..
            } = &e.kind
            else {
                continue;
            };
            names.push(e.name.clone());
            let marker = format_ident!("{}", command_marker(&e.name));
            let doc = doc_text(e);
            let wire = e.name.as_str();
            let module = e.module.as_str();
            let t = self.command_types(e);
            let (args_ty, wire_ret, ret) = (&t.args, &t.wire_ret, &t.ret);
            if let Some(MembersRef::Inline(ms)) = args {
                if !ms.is_empty() {
                    let owner = format!("{}Arguments", command_marker(&e.name));
                    let adoc = format!("The arguments of `{}`.", e.name);
                    items.extend(self.struct_def(&owner, &adoc, e.doc.as_ref(), ms));
                }
            }
            let deprecated = e.features.iter().any(|f| f == "deprecated");
            items.extend(quote! {
                #[doc = #doc]
                #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
                pub struct #marker;

                impl ::qmp_proto::Command for #marker {
                    const NAME: &'static str = #wire;
                    type Arguments = #args_ty;
                    type Returns = #wire_ret;
                }

                impl crate::runtime::CommandSpec for #marker {
                    const NAME: &'static str = #wire;
                    type Args = #args_ty;
                    type Ret = #ret;
                    const ALLOW_OOB: bool = #allow_oob;
                    const GROUP: &'static str = #module;
                    const DEPRECATED: bool = #deprecated;
                }
            });
        }
        quote! {
            /// Commands: one marker type per command (implementing
            /// [`qmp_proto::Command`] for clients and `CommandSpec` for the
            /// dispatcher), and the structs of commands whose arguments are
            /// written inline in the schema.
            pub mod cmd {
                #items

                /// The wire names of every command in the schema, in schema order.
                pub const ALL: &[&str] = &[#(#names),*];
            }
        }
    }

    /// The `event` module: markers, data structs, constructors and `AnyEvent`.
    pub fn events_module(&self) -> TokenStream {
        let mut items = TokenStream::new();
        let mut any_variants = TokenStream::new();
        let mut any_decode = TokenStream::new();
        let mut any_name = TokenStream::new();
        let mut names = Vec::new();
        for e in &self.schema.entities {
            let Kind::Event { data, .. } = &e.kind else {
                continue;
            };
            names.push(e.name.clone());
            let marker = format_ident!("{}", event_marker(&e.name));
            let doc = doc_text(e);
            let wire = e.name.as_str();
            let (data_ty, has_data) = match data {
                None => (quote!(crate::runtime::Empty), false),
                Some(MembersRef::Inline(ms)) if ms.is_empty() => {
                    (quote!(crate::runtime::Empty), false)
                }
                Some(MembersRef::Inline(ms)) => {
                    let owner = format!("{}Data", event_marker(&e.name));
                    let ddoc = format!("The data of the `{}` event.", e.name);
                    items.extend(self.struct_def(&owner, &ddoc, e.doc.as_ref(), ms));
                    let id = format_ident!("{}", owner);
                    (quote!(crate::event::#id), true)
                }
                Some(MembersRef::Named(n)) => (self.rust_type(&TypeRef::Named(n.clone())), true),
            };
            let ctor = if has_data {
                quote! {
                    /// Builds the event message, stamped with the current time.
                    pub fn message(data: &#data_ty) -> ::qmp_proto::EventMessage {
                        ::qmp_proto::EventMessage::new(#wire, Some(crate::runtime::QapiType::to_qmp(data)))
                    }
                }
            } else {
                quote! {
                    /// Builds the event message, stamped with the current time.
                    pub fn message() -> ::qmp_proto::EventMessage {
                        ::qmp_proto::EventMessage::new(#wire, None)
                    }
                }
            };
            items.extend(quote! {
                #[doc = #doc]
                #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
                pub struct #marker;

                impl ::qmp_proto::Event for #marker {
                    const NAME: &'static str = #wire;
                    type Data = #data_ty;
                }

                impl #marker { #ctor }
            });
            let vdoc = format!("The `{}` event.", e.name);
            any_variants.extend(quote!(#[doc = #vdoc] #marker(#data_ty),));
            any_decode.extend(quote! {
                #wire => Ok(Self::#marker(crate::runtime::QapiType::from_qmp(data, &mut d)?)),
            });
            any_name.extend(quote!(Self::#marker(_) => #wire,));
        }
        quote! {
            /// Events: one marker type per event with a constructor of its
            /// message, the structs of inline event data, and [`AnyEvent`](crate::event::AnyEvent) to
            /// decode whatever a server sends.
            pub mod event {
                #items

                /// Any event of the schema, decoded leniently; events this
                /// version does not know are kept whole.
                #[derive(Debug, Clone, PartialEq)]
                #[allow(clippy::large_enum_variant)]
                pub enum AnyEvent {
                    #any_variants
                    /// An event this version does not know.
                    Unrecognized(::qmp_proto::EventMessage),
                }

                impl AnyEvent {
                    /// Decodes an event message; unknown members and values are tolerated.
                    pub fn decode(msg: &::qmp_proto::EventMessage) -> ::std::result::Result<Self, crate::runtime::DecodeError> {
                        let data = msg.data.clone().unwrap_or_else(|| ::serde_json::Value::Object(Default::default()));
                        let mut d = crate::runtime::Decoder::lenient();
                        match msg.event.as_str() {
                            #any_decode
                            _ => Ok(Self::Unrecognized(msg.clone())),
                        }
                    }

                    /// The wire name of the event.
                    pub fn name(&self) -> &str {
                        match self {
                            #any_name
                            Self::Unrecognized(m) => &m.event,
                        }
                    }
                }

                /// The wire names of every event in the schema, in schema order.
                pub const ALL: &[&str] = &[#(#names),*];
            }
        }
    }

    /// The `handlers` module: one trait per command group and its registration.
    pub fn handlers_module(&self) -> TokenStream {
        let mut groups: BTreeMap<&str, Vec<&Entity>> = BTreeMap::new();
        for e in &self.schema.entities {
            if matches!(e.kind, Kind::Command { .. })
                && !BUILTIN_COMMANDS.contains(&e.name.as_str())
            {
                groups.entry(e.module.as_str()).or_default().push(e);
            }
        }
        let mut items = TokenStream::new();
        for (module, cmds) in groups {
            let tr = format_ident!("{}", group_trait(module));
            let reg = format_ident!("register_{}_commands", snake(module));
            let mut methods = TokenStream::new();
            let mut regs = TokenStream::new();
            for e in cmds {
                let m = format_ident!("{}", snake(&e.name));
                let marker = format_ident!("{}", command_marker(&e.name));
                let t = self.command_types(e);
                let (args_ty, ret) = (&t.args, &t.ret);
                let doc = doc_text(e);
                if t.no_args {
                    methods.extend(quote! {
                        #[doc = #doc]
                        fn #m(&mut self) -> ::std::result::Result<#ret, ::qmp_proto::QmpError>;
                    });
                    regs.extend(quote! {
                        self.register::<crate::cmd::#marker>(move |c, _| get(c).#m());
                    });
                } else {
                    methods.extend(quote! {
                        #[doc = #doc]
                        fn #m(&mut self, args: #args_ty) -> ::std::result::Result<#ret, ::qmp_proto::QmpError>;
                    });
                    regs.extend(quote! {
                        self.register::<crate::cmd::#marker>(move |c, a| get(c).#m(a));
                    });
                }
            }
            let tdoc = format!(
                "The commands of schema module `{module}`. Implement the whole group and register it \
                 with [`Dispatcher::{reg}`](crate::Dispatcher::{reg}); to offer only some commands, \
                 register them one by one with [`Dispatcher::register`](crate::Dispatcher::register)."
            );
            let rdoc = format!(
                "Registers every command of [`{tr}`], each calling the implementation that `get` \
                 finds in the context."
            );
            items.extend(quote! {
                #[doc = #tdoc]
                pub trait #tr { #methods }

                impl<C: 'static> crate::runtime::Dispatcher<C> {
                    #[doc = #rdoc]
                    pub fn #reg<G: #tr + ?Sized + 'static>(&mut self, get: fn(&mut C) -> &mut G) -> &mut Self {
                        #regs
                        self
                    }
                }
            });
        }
        quote! {
            /// Handler traits, one per command group (schema module).
            pub mod handlers {
                #items
            }
        }
    }
}
