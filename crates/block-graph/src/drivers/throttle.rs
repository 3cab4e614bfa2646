//! The `throttle` filter driver (QEMU's `block/throttle.c`): every request through the node
//! passes the buckets of a throttle group before it goes to the `file` child. The group is
//! named by `throttle-group` and must exist: created with `object-add` (`qom-type`
//! `throttle-group`), or by `block_set_io_throttle` with that `group` (the node then shares
//! the buckets with those BlockBackends, as in QEMU).
//!
//! Its options are the schema's `BlockdevOptionsThrottle`, so a throttle node is created like
//! any other: `blockdev-add`, `--blockdev`, or an inline child definition.
//!
//! A request that must wait sleeps on its own thread. While a root above the node is drained,
//! waiting requests pass at once (QEMU's `throttle_co_drain_begin`), so drain completes.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, OnceLock, Weak};

use qapi_types::BlockdevRef;
use serde_json::Value;

use crate::driver::{BlockDriver, DriverImageInfo, DriverStatus, WriteFlags, ZeroFlags};
use crate::drivers::OpenCtx;
use crate::error::{BlockError, Result};
use crate::graph::BlockGraph;
use crate::iov::{iov_len, iov_len_mut};
use crate::node::{Edge, Node};
use crate::perm::ChildRole;
use crate::throttle::ThrottleGroup;

/// The throttle filter's state.
pub struct ThrottleDriver {
    file: Arc<Edge>,
    group: Arc<ThrottleGroup>,
    node: Arc<OnceLock<Weak<Node>>>,
}

impl ThrottleDriver {
    /// Opens the filter on `file` (opened or found as the node's `file` child) with the
    /// existing group `group`.
    pub fn open(ctx: &mut OpenCtx<'_>, group: &str, file: &BlockdevRef) -> Result<Self> {
        let Some(g) = ctx.graph.throttle_groups.get(group) else {
            return Err(BlockError::generic(format!(
                "Throttle group '{group}' does not exist"
            )));
        };
        let file = ctx.open_child("file", file, ChildRole::Filtered)?;
        Ok(ThrottleDriver {
            file,
            group: g,
            node: ctx.node_cell(),
        })
    }

    /// The group the node's requests pass.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    fn intercept(&self, write: bool, bytes: u64) {
        if !self.group.is_enabled() {
            return;
        }
        let node = self.node.get().and_then(Weak::upgrade);
        self.group.intercept(write, bytes, || {
            node.as_ref().is_some_and(|n| n.drained_above())
        });
    }
}

impl BlockDriver for ThrottleDriver {
    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        Ok(self.file.length())
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.intercept(false, iov_len_mut(iov) as u64);
        self.file.read(offset, iov)
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        self.intercept(true, iov_len(iov) as u64);
        self.file.write(offset, iov, flags)
    }

    fn submit_batch(&self, reqs: &mut [crate::batch::BatchReq<'_>]) {
        for r in reqs.iter().filter(|r| r.is_pending()) {
            self.intercept(r.is_write(), r.len() as u64);
        }
        self.file.submit_batch(reqs)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.intercept(true, len);
        self.file.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // QEMU's throttle_co_pdiscard accounts discards as writes.
        self.intercept(true, len);
        self.file.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::delegate(&self.file, offset, len))
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.file.truncate(len)
    }

    fn strong_options(&self) -> Vec<(&'static str, Value)> {
        vec![("throttle-group", Value::from(self.group.name()))]
    }

    fn image_info(&self) -> DriverImageInfo {
        // A filter: QEMU's bdrv_get_info asks the filtered child.
        super::info_of_child(&self.file)
    }

    fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        super::snapshot_goto(&self.file.node(), id_or_name)
    }
}

impl BlockGraph {
    /// `object-add`: creates a `throttle-group` object `id` from its QOM properties
    /// (`limits`, or the legacy `x-` members). Other object types are refused.
    pub fn object_add(&mut self, qom_type: &str, id: &str, props: Value) -> Result<()> {
        if qom_type != "throttle-group" {
            return Err(BlockError::generic(format!(
                "Parameter 'qom-type' does not accept value '{qom_type}'"
            )));
        }
        if !crate::graph::id_wellformed(id) {
            return Err(BlockError::generic("Parameter 'id' expects an identifier"));
        }
        let props = match props {
            Value::Object(m) => m,
            Value::Null => Default::default(),
            _ => {
                return Err(BlockError::generic(
                    "Invalid parameter type for 'props', expected: object",
                ))
            }
        };
        let limits = crate::throttle::ThrottleLimits::from_qom_props(props)?;
        self.throttle_groups.add_object(id, limits)?;
        Ok(())
    }

    /// `object-del`: deletes a `throttle-group` object nobody uses.
    pub fn object_del(&mut self, id: &str) -> Result<()> {
        self.prune();
        self.throttle_groups.remove_object(id)
    }

    /// The limits of the throttle group `name` (an object or a backend's group).
    pub fn throttle_group_limits(&self, name: &str) -> Option<crate::throttle::ThrottleLimits> {
        self.throttle_groups.get(name).map(|g| g.limits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WriteFlags;
    use qapi_types::{BlockdevOptions, BlockdevOptionsBranch, QapiType};
    use serde_json::json;
    use std::time::{Duration, Instant};

    fn graph_with_null() -> BlockGraph {
        let mut g = BlockGraph::new();
        let o = BlockdevOptions::from_qmp_strict(json!({
            "driver": "null-co", "node-name": "n0", "size": 1 << 20, "read-zeroes": true
        }))
        .unwrap();
        g.blockdev_add(&o).unwrap();
        g
    }

    fn topts(v: Value) -> BlockdevOptions {
        BlockdevOptions::from_qmp_strict(v).unwrap()
    }

    #[test]
    fn options_decode_with_qemus_errors() {
        let e = |v| BlockdevOptions::from_qmp_strict(v).unwrap_err().0;
        assert_eq!(
            e(json!({"driver": "throttle", "node-name": "t", "file": "n0"})),
            "Parameter 'throttle-group' is missing"
        );
        assert_eq!(
            e(json!({"driver": "throttle", "throttle-group": "g", "node-name": "t"})),
            "Parameter 'file' is missing"
        );
        assert_eq!(
            e(json!({"driver": "throttle", "throttle-group": "g", "file": "n0", "size": 1})),
            "Parameter 'size' is unexpected"
        );
        assert_eq!(
            e(json!({"driver": "throttle", "throttle-group": 1, "file": "n0"})),
            "Invalid parameter type for 'throttle-group', expected: string"
        );
        let o = topts(
            json!({"driver": "throttle", "throttle-group": "g", "file": "n0",
                             "node-name": "t", "read-only": true}),
        );
        match &o.driver {
            BlockdevOptionsBranch::Throttle(t) => assert_eq!(t.throttle_group, "g"),
            other => panic!("decoded as {other:?}"),
        }
        assert_eq!(o.read_only, Some(true));
        assert_eq!(o.to_qmp()["driver"], "throttle");
        assert_eq!(o.to_qmp()["throttle-group"], "g");
    }

    #[test]
    fn an_inline_child_definition_creates_a_throttle_node() {
        let mut g = BlockGraph::new();
        g.object_add("throttle-group", "g", json!({})).unwrap();
        let o = topts(json!({"driver": "raw", "node-name": "r",
                             "file": {"driver": "throttle", "node-name": "t",
                                      "throttle-group": "g",
                                      "file": {"driver": "null-co", "size": 1 << 20}}}));
        let r = g.blockdev_add(&o).unwrap();
        let t = r.child("file").unwrap().node();
        assert_eq!((t.name(), t.driver_name()), ("t", "throttle"));
        assert_eq!(t.child("file").unwrap().node().driver_name(), "null-co");
        assert_eq!(r.length(), 1 << 20);
    }

    #[test]
    fn group_must_exist_and_objects_follow_qemu() {
        let mut g = graph_with_null();
        let t = topts(json!({"driver": "throttle", "node-name": "t0",
                             "throttle-group": "tg0", "file": "n0"}));
        assert_eq!(
            g.blockdev_add(&t).unwrap_err().to_string(),
            "Throttle group 'tg0' does not exist"
        );
        assert_eq!(
            g.object_add("rng-random", "r", Value::Null)
                .unwrap_err()
                .to_string(),
            "Parameter 'qom-type' does not accept value 'rng-random'"
        );
        assert_eq!(
            g.object_add("throttle-group", "t g", Value::Null)
                .unwrap_err()
                .to_string(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            g.object_add("throttle-group", "x", json!({"limits": {"foo": 1}}))
                .unwrap_err()
                .to_string(),
            "Parameter 'limits.foo' is unexpected"
        );
        assert_eq!(
            g.object_add("throttle-group", "x", json!({"x-iops-total": -1}))
                .unwrap_err()
                .to_string(),
            "Property values cannot be negative"
        );
        assert_eq!(
            g.object_add(
                "throttle-group",
                "x",
                json!({"limits": {"bps-total-max": 5}})
            )
            .unwrap_err()
            .to_string(),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        g.object_add(
            "throttle-group",
            "tg0",
            json!({"x-iops-total": 100, "limits": {"bps-read": 1}}),
        )
        .unwrap();
        let l = g.throttle_group_limits("tg0").unwrap();
        assert_eq!((l.iops_total.avg, l.bps_read.avg), (100, 1));
        assert_eq!(
            g.object_add("throttle-group", "tg0", Value::Null)
                .unwrap_err()
                .to_string(),
            "attempt to add duplicate property 'tg0' to object (type 'container')"
        );
        let n = g.blockdev_add(&t).unwrap();
        assert_eq!(n.driver_name(), "throttle");
        assert!(n.driver().is_filter());
        assert_eq!(n.length(), 1 << 20);
        assert_eq!(
            g.object_del("tg0").unwrap_err().to_string(),
            "object 'tg0' is in use, can not be deleted"
        );
        drop(n);
        g.blockdev_del("t0").unwrap();
        g.object_del("tg0").unwrap();
        assert_eq!(
            g.object_del("tg0").unwrap_err().to_string(),
            "object 'tg0' not found"
        );
    }

    #[test]
    fn filter_throttles_and_passes_data() {
        let mut g = graph_with_null();
        // 20 operations per second, bursts of avg/10 = 2 before throttling starts.
        g.object_add(
            "throttle-group",
            "tg",
            json!({"limits": {"iops-total": 20}}),
        )
        .unwrap();
        let t = topts(json!({"driver": "throttle", "node-name": "t",
                             "throttle-group": "tg", "file": "n0"}));
        let n = g.blockdev_add(&t).unwrap();
        let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
        g.attach_device(&be, crate::DeviceAttach::disk("v"))
            .unwrap();
        let start = Instant::now();
        let mut buf = [1u8; 512];
        for _ in 0..6 {
            be.read_buf(0, &mut buf).unwrap();
        }
        be.write_buf(512, &buf, WriteFlags::default()).unwrap();
        // 7 requests: 2 in the bucket, 5 more at 20/s, about 250 ms.
        let el = start.elapsed();
        assert!(el >= Duration::from_millis(180), "{el:?}");
        assert!(el < Duration::from_secs(2), "{el:?}");
        assert_eq!(buf, [0u8; 512], "null-co read-zeroes through the filter");
        let st = be.block_status(0, 4096).unwrap();
        assert_eq!(st.node, "n0", "block status delegates to the child");
        // A drained section lets waiting requests through at once.
        let be2 = be.clone();
        let h = std::thread::spawn(move || {
            let mut b = [0u8; 512];
            for _ in 0..10 {
                be2.read_buf(0, &mut b).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        {
            let _d = g.drain(std::slice::from_ref(&n));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "drain waited for the throttle"
        );
        h.join().unwrap();
    }

    #[test]
    fn unlimited_group_does_not_wait() {
        let mut g = graph_with_null();
        g.object_add("throttle-group", "free", json!({})).unwrap();
        let t = topts(json!({"driver": "throttle", "node-name": "t",
                             "throttle-group": "free", "file": "n0"}));
        let n = g.blockdev_add(&t).unwrap();
        let be = g
            .new_root(&n, crate::Perm::CONSISTENT_READ, crate::Perm::ALL, "test")
            .unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 512];
        for _ in 0..1000 {
            be.read_buf(0, &mut buf).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
