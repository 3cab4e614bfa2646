//! The QMP handlers of the block commands, registered on a `qapi_types::Dispatcher`.
//!
//! [`register`] registers exactly the commands implemented here; `query-commands` and
//! `query-qmp-schema` then list them and nothing else.
//!
//! `blockdev-add` accepts both forms: QEMU 7.x's flat options and QEMU 2.x's
//! `{"options": {...}}`. The schema declares the flat form; the handler is registered with
//! its own argument type ([`BlockdevAddArgs`]) whose decoder unwraps a lone `options` member
//! before the strict decoding of `BlockdevOptions` (errors then name `options.driver`, as
//! QEMU 2.x named them).
//!
//! ```
//! use block_graph::BlockGraph;
//! use qapi_types::Dispatcher;
//! use qmp_proto::Request;
//! use serde_json::json;
//!
//! struct Vmm { block: BlockGraph }
//! let mut d = Dispatcher::<Vmm>::new();
//! block_graph::qmp::register(&mut d, |vmm| &mut vmm.block);
//! let mut vmm = Vmm { block: BlockGraph::new() };
//! let run = |d: &Dispatcher<Vmm>, vmm: &mut Vmm, cmd: &str, args: serde_json::Value| {
//!     let req = Request { id: None, command: cmd.into(),
//!         arguments: args.as_object().cloned().unwrap_or_default(), oob: false };
//!     d.dispatch(vmm, &req)
//! };
//! run(&d, &mut vmm, "blockdev-add", json!({"options": {"driver": "null-co", "node-name": "n0"}})).unwrap();
//! let nodes = run(&d, &mut vmm, "query-named-block-nodes", json!({})).unwrap();
//! assert_eq!(nodes[0]["node-name"], "n0");
//! let e = run(&d, &mut vmm, "blockdev-del", json!({"node-name": "nope"})).unwrap_err();
//! assert_eq!(e.desc, "Failed to find node with node-name='nope'");
//! ```

pub mod query;

use qapi_types::runtime::{CommandSpec, DecodeError, Decoder};
use qapi_types::{cmd, BlockdevChangeReadOnlyMode, BlockdevOptions, Dispatcher, QapiType};
use qmp_proto::QmpError;
use serde_json::Value;

use crate::error::BlockError;
use crate::graph::BlockGraph;

/// The arguments of `blockdev-add`: the flat options, or QEMU 2.x's `{"options": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevAddArgs(pub BlockdevOptions);

impl QapiType for BlockdevAddArgs {
    fn to_qmp(&self) -> Value {
        self.0.to_qmp()
    }

    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        if let Value::Object(m) = &v {
            if m.len() == 1 && m.get("options").is_some_and(Value::is_object) {
                let mut m = m.clone();
                let o: BlockdevOptions = d.member(&mut m, "options")?;
                return Ok(BlockdevAddArgs(o));
            }
        }
        BlockdevOptions::from_qmp(v, d).map(BlockdevAddArgs)
    }
}

/// `blockdev-add` with [`BlockdevAddArgs`] (registered in place of the generated marker).
pub struct BlockdevAdd;

impl CommandSpec for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Args = BlockdevAddArgs;
    type Ret = ();
    const ALLOW_OOB: bool = false;
    const GROUP: &'static str = "block-core";
    const DEPRECATED: bool = false;
}

/// The arguments of `object-add`: QEMU 2.x's `{"qom-type", "id", "props": {...}}` (what
/// the schema declares) or QEMU 7.x's flat form with the properties beside `qom-type`.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectAddArgs {
    /// The object type (only `throttle-group` is implemented).
    pub qom_type: String,
    /// The object's id.
    pub id: String,
    /// The properties (an object, or `null`).
    pub props: Value,
}

impl QapiType for ObjectAddArgs {
    fn to_qmp(&self) -> Value {
        serde_json::json!({"qom-type": self.qom_type, "id": self.id, "props": self.props})
    }

    fn from_qmp(v: Value, d: &mut Decoder) -> Result<Self, DecodeError> {
        let mut m = d.object(v)?;
        let qom_type: String = d.member(&mut m, "qom-type")?;
        let id: String = d.member(&mut m, "id")?;
        let props = match d.optional::<Value>(&mut m, "props")? {
            Some(p) => {
                d.finish(m)?;
                p
            }
            None => Value::Object(m),
        };
        Ok(ObjectAddArgs {
            qom_type,
            id,
            props,
        })
    }
}

/// `object-add` with [`ObjectAddArgs`].
pub struct ObjectAdd;

impl CommandSpec for ObjectAdd {
    const NAME: &'static str = "object-add";
    type Args = ObjectAddArgs;
    type Ret = ();
    const ALLOW_OOB: bool = false;
    const GROUP: &'static str = "misc";
    const DEPRECATED: bool = false;
}

fn q<T>(r: crate::error::Result<T>) -> Result<T, QmpError> {
    r.map_err(QmpError::from)
}

/// The names of the commands [`register`] installs.
pub const COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "x-blockdev-del",
    "query-block",
    "query-named-block-nodes",
    "query-blockstats",
    "block_resize",
    "block_passwd",
    "block-set-write-threshold",
    "block_set_io_throttle",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-delete-internal-sync",
    "change-backing-file",
    "blockdev-open-tray",
    "blockdev-close-tray",
    "blockdev-remove-medium",
    "blockdev-insert-medium",
    "x-blockdev-remove-medium",
    "x-blockdev-insert-medium",
    "eject",
    "blockdev-change-medium",
    "change",
    "transaction",
    "x-blockdev-change",
    "object-add",
    "object-del",
];

/// Registers the block commands on `d`; `get` finds the graph in the dispatcher's context.
pub fn register<C: 'static>(d: &mut Dispatcher<C>, get: fn(&mut C) -> &mut BlockGraph) {
    d.register::<BlockdevAdd>(move |c, a| q(get(c).blockdev_add(&a.0).map(|_| ())));
    d.register::<ObjectAdd>(move |c, a| q(get(c).object_add(&a.qom_type, &a.id, a.props)));
    d.register::<cmd::ObjectDel>(move |c, a| q(get(c).object_del(&a.id)));
    d.register::<cmd::BlockdevDel>(move |c, a| q(get(c).blockdev_del(&a.node_name)));
    d.register::<cmd::XBlockdevDel>(move |c, a| {
        q(get(c).x_blockdev_del(a.id.as_deref(), a.node_name.as_deref()))
    });
    d.register::<cmd::QueryBlock>(move |c, _| Ok(get(c).query_block()));
    d.register::<cmd::QueryNamedBlockNodes>(move |c, a| {
        Ok(get(c).query_named_block_nodes(a.flat.unwrap_or(false)))
    });
    d.register::<cmd::QueryBlockstats>(move |c, a| {
        Ok(get(c).query_blockstats(a.query_nodes.unwrap_or(false)))
    });
    d.register::<cmd::BlockResize>(move |c, a| {
        q(get(c).block_resize(a.device.as_deref(), a.node_name.as_deref(), a.size))
    });
    d.register::<cmd::BlockPasswd>(move |c, a| {
        let g = get(c);
        let n = q(g.lookup(a.device.as_deref(), a.node_name.as_deref()))?;
        let who = g
            .backend_of(&n)
            .map(|b| b.name().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| n.name().to_string());
        Err(QmpError::generic(format!(
            "Device '{who}' is not encrypted"
        )))
    });
    d.register::<cmd::BlockSetWriteThreshold>(move |c, a| {
        let n = get(c)
            .find_node(&a.node_name)
            .ok_or_else(|| QmpError::generic(format!("Device '{}' not found", a.node_name)))?;
        n.set_write_threshold(a.write_threshold);
        Ok(())
    });
    d.register::<cmd::BlockSetIoThrottle>(move |c, a| q(get(c).set_io_throttle(&a)));
    d.register::<cmd::BlockDirtyBitmapAdd>(move |c, a| {
        q(get(c)
            .bitmap_add(
                &a.node,
                &a.name,
                a.granularity,
                a.persistent.unwrap_or(false),
                a.disabled.unwrap_or(false),
            )
            .map(|_| ()))
    });
    d.register::<cmd::BlockDirtyBitmapRemove>(move |c, a| {
        q(get(c).bitmap_remove(&a.node, &a.name).map(|_| ()))
    });
    d.register::<cmd::BlockDirtyBitmapClear>(move |c, a| q(get(c).bitmap_clear(&a.node, &a.name)));
    d.register::<cmd::BlockDirtyBitmapEnable>(move |c, a| {
        q(get(c).bitmap_set_enabled(&a.node, &a.name, true))
    });
    d.register::<cmd::BlockDirtyBitmapDisable>(move |c, a| {
        q(get(c).bitmap_set_enabled(&a.node, &a.name, false))
    });
    d.register::<cmd::BlockDirtyBitmapMerge>(move |c, a| {
        q(get(c)
            .bitmap_merge(&a.node, &a.target, &a.bitmaps)
            .map(|_| ()))
    });
    d.register::<cmd::BlockdevSnapshot>(move |c, a| {
        q(get(c).transaction(
            &[action(B::BlockdevSnapshot(
                qapi_types::BlockdevSnapshotWrapper { data: a },
            ))],
            None,
        ))
    });
    d.register::<cmd::BlockdevSnapshotSync>(move |c, a| {
        q(get(c).transaction(
            &[action(B::BlockdevSnapshotSync(
                qapi_types::BlockdevSnapshotSyncWrapper { data: a },
            ))],
            None,
        ))
    });
    d.register::<cmd::BlockdevSnapshotInternalSync>(move |c, a| {
        q(get(c).transaction(
            &[action(B::BlockdevSnapshotInternalSync(
                qapi_types::BlockdevSnapshotInternalWrapper { data: a },
            ))],
            None,
        ))
    });
    d.register::<cmd::BlockdevSnapshotDeleteInternalSync>(move |c, a| {
        q(get(c).snapshot_delete_internal(&a.device, a.id.as_deref(), a.name.as_deref()))
    });
    d.register::<cmd::ChangeBackingFile>(move |c, a| {
        q(get(c).change_backing_file(&a.device, &a.image_node_name, &a.backing_file))
    });
    d.register::<cmd::BlockdevOpenTray>(move |c, a| {
        q(get(c).open_tray(
            a.device.as_deref(),
            a.id.as_deref(),
            a.force.unwrap_or(false),
        ))
    });
    d.register::<cmd::BlockdevCloseTray>(move |c, a| {
        q(get(c).close_tray(a.device.as_deref(), a.id.as_deref()))
    });
    d.register::<cmd::BlockdevRemoveMedium>(move |c, a| q(get(c).remove_medium(None, Some(&a.id))));
    d.register::<cmd::BlockdevInsertMedium>(move |c, a| {
        q(get(c).insert_medium(None, Some(&a.id), &a.node_name))
    });
    d.register::<cmd::XBlockdevRemoveMedium>(move |c, a| {
        q(get(c).remove_medium(Some(&a.device), None))
    });
    d.register::<cmd::XBlockdevInsertMedium>(move |c, a| {
        q(get(c).insert_medium(Some(&a.device), None, &a.node_name))
    });
    d.register::<cmd::Eject>(move |c, a| {
        q(get(c).eject(
            a.device.as_deref(),
            a.id.as_deref(),
            a.force.unwrap_or(false),
        ))
    });
    d.register::<cmd::BlockdevChangeMedium>(move |c, a| {
        q(get(c).change_medium(
            a.device.as_deref(),
            a.id.as_deref(),
            &a.filename,
            a.format.as_deref(),
            a.force.unwrap_or(false),
            a.read_only_mode
                .clone()
                .unwrap_or(BlockdevChangeReadOnlyMode::Retain),
        ))
    });
    d.register::<cmd::Change>(move |c, a| {
        if a.device == "vnc" {
            return Err(QmpError::generic("VNC is not supported by this VMM"));
        }
        q(get(c).change_medium(
            Some(&a.device),
            None,
            &a.target,
            a.arg.as_deref(),
            false,
            BlockdevChangeReadOnlyMode::Retain,
        ))
    });
    d.register::<cmd::XBlockdevChange>(move |c, a| {
        q(get(c).x_blockdev_change(&a.parent, a.child.as_deref(), a.node.as_deref()))
    });
    d.register::<cmd::Transaction>(move |c, a| {
        q(get(c).transaction(&a.actions, a.properties.as_ref()))
    });
}

use qapi_types::TransactionActionBranch as B;

/// A transaction of one action (QEMU's `blockdev_do_action`).
fn action(b: B) -> qapi_types::TransactionAction {
    qapi_types::TransactionAction { r#type: b }
}

impl BlockGraph {
    /// `x-blockdev-del` (QEMU 2.5 to 2.8): deletes a backend added with `blockdev-add`
    /// and `id`, or a node.
    pub fn x_blockdev_del(
        &mut self,
        id: Option<&str>,
        node_name: Option<&str>,
    ) -> crate::Result<()> {
        match (id, node_name) {
            (Some(_), Some(_)) => Err(BlockError::generic(
                "Only one of id and node-name must be specified",
            )),
            (None, None) => Err(BlockError::generic("No block device specified")),
            (Some(id), None) => {
                let Some(be) = self.find_backend(id) else {
                    return Err(BlockError::generic(format!(
                        "Cannot find block backend {id}"
                    )));
                };
                if be.device().is_some() {
                    return Err(BlockError::generic(format!("Block backend {id} is in use")));
                }
                if let Some(n) = be.root_node() {
                    if n.parents().len() > 1 {
                        return Err(BlockError::generic(format!("Block device {id} is in use")));
                    }
                }
                self.delete_backend(id)
            }
            (None, Some(n)) => {
                let Some(node) = self.find_node(n) else {
                    return Err(BlockError::generic(format!("Cannot find node {n}")));
                };
                if let Some(b) = self.backend_of(&node) {
                    return Err(BlockError::generic(format!(
                        "Node {n} is in use by {}",
                        b.name()
                    )));
                }
                drop(node);
                self.blockdev_del(n).map_err(|e| match e {
                    BlockError::Generic(m) if m.starts_with("Failed to find") => {
                        BlockError::generic(format!("Cannot find node {n}"))
                    }
                    other => other,
                })
            }
        }
    }
}
