//! `query-block`, `query-named-block-nodes` and `query-blockstats`, shaped as QEMU shapes
//! them (QEMU's `block/qapi.c`).

use std::sync::Arc;

use qapi_types::{
    BlockDeviceInfo, BlockDirtyInfo, BlockInfo, BlockStats, BlockdevCacheInfo,
    BlockdevDetectZeroesOptions, DirtyBitmapStatus, ImageInfo,
};

use crate::backend::BlockBackend;
use crate::graph::BlockGraph;
use crate::node::{DetectZeroes, Node};
use crate::perm::ChildRole;
use crate::stats::node_only_stats;

/// The dirty bitmaps of a node as `query-block` shows them (newest first).
pub fn dirty_info(n: &Node) -> Vec<BlockDirtyInfo> {
    n.bitmaps()
        .iter()
        .map(|b| {
            let status = if b.is_inconsistent() {
                DirtyBitmapStatus::Inconsistent
            } else if b.is_busy() {
                DirtyBitmapStatus::Locked
            } else if !b.is_enabled() {
                DirtyBitmapStatus::Disabled
            } else {
                DirtyBitmapStatus::Active
            };
            BlockDirtyInfo {
                // Jobs' bitmaps are anonymous (QEMU shows them without a name).
                name: (!b.name().is_empty()).then(|| b.name().to_string()),
                count: b.count() as i64,
                granularity: b.granularity() as u32,
                status,
                recording: b.is_enabled() && !b.is_inconsistent(),
                busy: b.is_busy(),
                persistent: b.is_persistent(),
                inconsistent: b.is_inconsistent().then_some(true),
            }
        })
        .collect()
}

/// The node below filters that users are not aware of.
fn skip_implicit(n: Arc<Node>) -> Arc<Node> {
    let mut cur = n;
    while cur.is_implicit() {
        match cur.primary_child() {
            Some(c) => cur = c.node(),
            None => break,
        }
    }
    cur
}

/// The next layer of the chain for image info: the backing node, or a filter's child.
fn filter_or_cow(n: &Node) -> Option<Arc<Node>> {
    if let Some(b) = n.backing() {
        return Some(b.node());
    }
    if n.driver().is_filter() {
        return n.primary_child().map(|e| e.node());
    }
    None
}

/// A throttle value QEMU shows only when set.
fn nz(v: Option<u64>) -> Option<i64> {
    v.filter(|x| *x != 0).map(|x| x as i64)
}

/// A burst length, shown when its burst rate is set.
fn burst(b: Option<crate::throttle::BucketLimit>) -> Option<i64> {
    b.filter(|b| b.max != 0).map(|b| b.burst_length as i64)
}

/// QEMU's `ImageInfo` of one node (without its backing image).
pub fn image_info(n: &Node) -> ImageInfo {
    let d = n.driver().image_info();
    let filename = crate::drivers::node_filename(n);
    let actual = n.driver().allocated_size().or_else(|| {
        n.primary_child()
            .and_then(|c| c.node().driver().allocated_size())
    });
    let base = crate::filename::base_filename(n);
    let full_backing = d
        .backing_filename
        .as_ref()
        .and_then(|b| crate::drivers::full_backing_filename(&base, b).ok());
    let snapshots = (!d.snapshots.is_empty()).then(|| d.snapshots.clone());
    ImageInfo {
        filename,
        format: n.driver_name().to_string(),
        dirty_flag: d.dirty_flag,
        actual_size: actual.map(|a| a as i64),
        virtual_size: n.length() as i64,
        cluster_size: d.cluster_size.map(|c| c as i64),
        encrypted: None,
        compressed: None,
        backing_filename: d.backing_filename.clone(),
        full_backing_filename: full_backing,
        backing_filename_format: d.backing_filename_format.clone(),
        snapshots,
        backing_image: None,
        format_specific: d.format_specific,
    }
}

/// QEMU's `bdrv_block_device_info`: a node as `query-named-block-nodes` and `query-block`'s
/// `inserted` show it. `blk` is the backend when called for `query-block` (then throttling
/// comes from it and implicit filters are skipped); `flat` omits the backing images.
pub fn block_device_info(blk: Option<&BlockBackend>, n: &Arc<Node>, flat: bool) -> BlockDeviceInfo {
    let o = n.options();
    let mut image = image_info(n);
    let mut depth = 0i64;
    if !flat {
        let mut chain = Vec::new();
        let mut cur = n.clone();
        while let Some(next) = filter_or_cow(&cur) {
            depth += 1;
            let next = if blk.is_some() {
                skip_implicit(next)
            } else {
                next
            };
            chain.push(image_info(&next));
            cur = next;
        }
        // Nest the chain: image.backing-image.backing-image...
        let mut nested: Option<ImageInfo> = None;
        for mut i in chain.into_iter().rev() {
            i.backing_image = nested.map(Box::new);
            nested = Some(i);
        }
        image.backing_image = nested.map(Box::new);
    }
    let thr = blk.and_then(|b| b.throttle_config());
    let g = |f: fn(&crate::throttle::ThrottleLimits) -> i64| thr.as_ref().map_or(0, f);
    let bitmaps = dirty_info(n);
    BlockDeviceInfo {
        file: crate::drivers::node_filename(n),
        node_name: Some(n.name().to_string()),
        ro: n.is_read_only(),
        drv: n.driver_name().to_string(),
        backing_file: n
            .backing()
            .map(|b| crate::drivers::node_filename(&b.node())),
        backing_file_depth: depth,
        encrypted: false,
        encryption_key_missing: false,
        detect_zeroes: match o.detect_zeroes {
            DetectZeroes::Off => BlockdevDetectZeroesOptions::Off,
            DetectZeroes::On => BlockdevDetectZeroesOptions::On,
            DetectZeroes::Unmap => BlockdevDetectZeroesOptions::Unmap,
        },
        bps: g(|t| t.bps_total.avg as i64),
        bps_rd: g(|t| t.bps_read.avg as i64),
        bps_wr: g(|t| t.bps_write.avg as i64),
        iops: g(|t| t.iops_total.avg as i64),
        iops_rd: g(|t| t.iops_read.avg as i64),
        iops_wr: g(|t| t.iops_write.avg as i64),
        image,
        bps_max: nz(thr.as_ref().map(|t| t.bps_total.max)),
        bps_rd_max: nz(thr.as_ref().map(|t| t.bps_read.max)),
        bps_wr_max: nz(thr.as_ref().map(|t| t.bps_write.max)),
        iops_max: nz(thr.as_ref().map(|t| t.iops_total.max)),
        iops_rd_max: nz(thr.as_ref().map(|t| t.iops_read.max)),
        iops_wr_max: nz(thr.as_ref().map(|t| t.iops_write.max)),
        bps_max_length: burst(thr.as_ref().map(|t| t.bps_total)),
        bps_rd_max_length: burst(thr.as_ref().map(|t| t.bps_read)),
        bps_wr_max_length: burst(thr.as_ref().map(|t| t.bps_write)),
        iops_max_length: burst(thr.as_ref().map(|t| t.iops_total)),
        iops_rd_max_length: burst(thr.as_ref().map(|t| t.iops_read)),
        iops_wr_max_length: burst(thr.as_ref().map(|t| t.iops_write)),
        iops_size: nz(thr.as_ref().map(|t| t.iops_size)),
        group: thr.as_ref().map(|t| t.group.clone()),
        cache: BlockdevCacheInfo {
            writeback: o.cache_writeback,
            direct: o.cache_direct,
            no_flush: o.cache_no_flush,
        },
        write_threshold: n.write_threshold() as i64,
        dirty_bitmaps: (!bitmaps.is_empty()).then_some(bitmaps),
    }
}

impl BlockGraph {
    /// `query-block`: every named backend and every backend with a device.
    pub fn query_block(&self) -> Vec<BlockInfo> {
        self.backends
            .iter()
            .filter(|b| !b.name().is_empty() || b.device().is_some())
            .map(|b| {
                let root = b.root_node().map(skip_implicit);
                let inserted = root.as_ref().map(|n| block_device_info(Some(b), n, false));
                let bitmaps = root.as_ref().map(|n| dirty_info(n)).unwrap_or_default();
                BlockInfo {
                    device: b.name().to_string(),
                    qdev: b.device().map(|d| d.id),
                    r#type: "unknown".into(),
                    removable: b.is_removable(),
                    locked: b.is_locked(),
                    inserted,
                    tray_open: b.has_tray().then(|| b.is_tray_open()),
                    io_status: b.iostatus(),
                    dirty_bitmaps: (!bitmaps.is_empty()).then_some(bitmaps),
                }
            })
            .collect()
    }

    /// `query-named-block-nodes`: every node, newest first (as QEMU lists them).
    pub fn query_named_block_nodes(&self, flat: bool) -> Vec<BlockDeviceInfo> {
        let mut v: Vec<BlockDeviceInfo> = self
            .nodes()
            .iter()
            .map(|n| block_device_info(None, n, flat))
            .collect();
        v.reverse();
        v
    }

    /// `query-blockstats`: per backend (with `parent` and `backing` stats of the nodes), or
    /// with `query_nodes` per node (with `parent` only).
    pub fn query_blockstats(&self, query_nodes: bool) -> Vec<BlockStats> {
        if query_nodes {
            return self
                .nodes()
                .iter()
                .map(|n| node_stats(Some(n.clone()), false))
                .collect();
        }
        self.backends
            .iter()
            .filter(|b| !b.name().is_empty() || b.device().is_some())
            .map(|b| {
                let root = b.root_node();
                let mut s = node_stats(root.clone(), true);
                s.device = Some(b.name().to_string());
                let hi = root
                    .map(|r| skip_implicit(r).wr_highest_offset())
                    .unwrap_or(0);
                s.stats = b.stats().report(hi);
                s
            })
            .collect()
    }
}

/// The child whose statistics `parent` shows: the primary child if it stores data, else
/// the only data child.
fn stats_child(n: &Node) -> Option<Arc<Node>> {
    let children = n.children();
    if let Some(p) = n.primary_child() {
        if matches!(
            p.role(),
            ChildRole::Image | ChildRole::Data | ChildRole::Filtered
        ) {
            return Some(p.node());
        }
    }
    let data: Vec<_> = children
        .iter()
        .filter(|c| matches!(c.role(), ChildRole::Data | ChildRole::Image))
        .collect();
    (data.len() == 1).then(|| data[0].node())
}

/// QEMU's `bdrv_query_bds_stats`.
fn node_stats(n: Option<Arc<Node>>, blk_level: bool) -> BlockStats {
    let Some(n) = n else {
        return BlockStats {
            device: None,
            node_name: None,
            stats: node_only_stats(0),
            parent: None,
            backing: None,
        };
    };
    let n = if blk_level { skip_implicit(n) } else { n };
    BlockStats {
        device: None,
        node_name: Some(n.name().to_string()),
        stats: node_only_stats(n.wr_highest_offset()),
        parent: stats_child(&n).map(|c| Box::new(node_stats(Some(c), blk_level))),
        backing: if blk_level {
            n.backing()
                .map(|b| Box::new(node_stats(Some(b.node()), blk_level)))
        } else {
            None
        },
    }
}
