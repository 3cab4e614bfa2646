//! The dispatcher: routes a request to the registered handler, decoding its
//! arguments with QEMU's rules and encoding its result.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::OnceLock;

use qmp_proto::{ErrorClass, QmpError, Request};
use serde_json::{json, Value};

use crate::runtime::{CommandSpec, Decoder, Object, QapiType};

type Handler<C> = Box<dyn Fn(&mut C, Object) -> Result<Value, QmpError>>;

struct Entry<C> {
    handler: Handler<C>,
    allow_oob: bool,
}

/// Commands the protocol session answers itself; listed by `query-commands`.
const SESSION_COMMANDS: &[&str] = &["qmp_capabilities"];
/// Commands the dispatcher answers itself.
const INTROSPECTION_COMMANDS: &[&str] = &["query-commands", "query-qmp-schema"];

/// Routes QMP requests to typed handlers over a context `C` (typically the
/// VMM's state).
///
/// Only registered commands exist: `query-commands` and `query-qmp-schema`
/// (answered by the dispatcher itself) list exactly those, so management
/// software never sees a command that only errors.
///
/// ```
/// use qapi_types::{cmd, Dispatcher, VersionInfo, VersionTriple};
/// use qmp_proto::Request;
///
/// struct Vmm { name: Option<String> }
/// let mut d = Dispatcher::<Vmm>::new();
/// d.register::<cmd::QueryVersion>(|_vmm, _args| {
///     Ok(VersionInfo {
///         qemu: VersionTriple { major: 7, minor: 2, micro: 0 },
///         package: "example".into(),
///     })
/// });
/// let mut vmm = Vmm { name: None };
/// let req = Request { id: None, command: "query-version".into(), arguments: Default::default(), oob: false };
/// let reply = d.dispatch(&mut vmm, &req).unwrap();
/// assert_eq!(reply["qemu"]["major"], 7);
/// let err = d.dispatch(&mut vmm, &Request { command: "query-name".into(), ..req }).unwrap_err();
/// assert_eq!(err.desc, "The command query-name has not been found");
/// ```
pub struct Dispatcher<C> {
    entries: BTreeMap<&'static str, Entry<C>>,
}

impl<C: 'static> Default for Dispatcher<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: 'static> Dispatcher<C> {
    /// A dispatcher with no command registered.
    pub fn new() -> Self {
        Dispatcher {
            entries: BTreeMap::new(),
        }
    }

    /// Registers the handler of command `K`, replacing any earlier one.
    pub fn register<K: CommandSpec>(
        &mut self,
        handler: impl Fn(&mut C, K::Args) -> Result<K::Ret, QmpError> + 'static,
    ) -> &mut Self {
        let handler: Handler<C> = Box::new(move |ctx, args| {
            let args = K::Args::from_qmp(Value::Object(args), &mut Decoder::strict())?;
            handler(ctx, args).map(|r| r.to_qmp())
        });
        self.entries.insert(
            K::NAME,
            Entry {
                handler,
                allow_oob: K::ALLOW_OOB,
            },
        );
        self
    }

    /// Removes a command; returns whether it was registered.
    pub fn unregister(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }

    /// Whether a command can be executed.
    pub fn is_registered(&self, name: &str) -> bool {
        self.entries.contains_key(name)
            || SESSION_COMMANDS.contains(&name)
            || INTROSPECTION_COMMANDS.contains(&name)
    }

    /// The names of every command that can be executed, sorted.
    pub fn commands(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.entries.keys().copied().collect();
        names.extend(SESSION_COMMANDS);
        names.extend(INTROSPECTION_COMMANDS);
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Executes a request: looks the command up, checks `exec-oob`, decodes
    /// the arguments strictly and calls the handler.
    pub fn dispatch(&self, ctx: &mut C, request: &Request) -> Result<Value, QmpError> {
        let name = request.command.as_str();
        let entry = self.entries.get(name);
        let allow_oob = entry.is_some_and(|e| e.allow_oob);
        if request.oob && !allow_oob && self.is_registered(name) {
            return Err(QmpError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        if let Some(e) = entry {
            return (e.handler)(ctx, request.arguments.clone());
        }
        match name {
            "query-commands" => {
                crate::runtime::Empty::from_qmp_strict(Value::Object(request.arguments.clone()))?;
                Ok(Value::Array(
                    self.commands()
                        .into_iter()
                        .map(|n| json!({ "name": n }))
                        .collect(),
                ))
            }
            "query-qmp-schema" => {
                crate::runtime::Empty::from_qmp_strict(Value::Object(request.arguments.clone()))?;
                Ok(Value::Array(self.schema_info()))
            }
            "qmp_capabilities" => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    /// The `query-qmp-schema` list: the registered commands, every event, and
    /// the types they use.
    pub fn schema_info(&self) -> Vec<Value> {
        let all = full_schema_info();
        let commands: HashSet<&str> = self.commands().into_iter().collect();
        let by_name: BTreeMap<&str, &Value> = all
            .iter()
            .filter_map(|v| Some((v.get("name")?.as_str()?, v)))
            .collect();
        let mut keep: HashSet<&str> = HashSet::new();
        let mut queue: VecDeque<&str> = all
            .iter()
            .filter(|v| match v["meta-type"].as_str() {
                Some("command") => v["name"].as_str().is_some_and(|n| commands.contains(n)),
                Some("event") => true,
                _ => false,
            })
            .filter_map(|v| v["name"].as_str())
            .collect();
        while let Some(name) = queue.pop_front() {
            if !keep.insert(name) {
                continue;
            }
            let Some(v) = by_name.get(name) else { continue };
            let mut refs: Vec<&str> = ["arg-type", "ret-type", "element-type"]
                .iter()
                .filter_map(|k| v.get(*k)?.as_str())
                .collect();
            for list in ["members", "variants"] {
                if let Some(items) = v.get(list).and_then(Value::as_array) {
                    refs.extend(items.iter().filter_map(|m| m.get("type")?.as_str()));
                }
            }
            queue.extend(refs);
        }
        all.iter()
            .filter(|v| v["name"].as_str().is_some_and(|n| keep.contains(n)))
            .cloned()
            .collect()
    }
}

/// The complete introspection list of the schema, parsed once.
pub fn full_schema_info() -> &'static [Value] {
    static INFO: OnceLock<Vec<Value>> = OnceLock::new();
    INFO.get_or_init(|| serde_json::from_str(crate::SCHEMA_INFO_JSON).unwrap_or_default())
}
