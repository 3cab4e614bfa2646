//! The mirror and backup commands' arguments: their error policies and job options,
//! QEMU's checks and defaults for `granularity` and `buf-size`, the target image that
//! `drive-mirror` and `drive-backup` create or open, and the `drive-mirror` and
//! `blockdev-mirror` commands, which turn their arguments into [`MirrorParams`].

use std::sync::Arc;

use block_graph::{BlockGraph, Node};
use qapi_types::{
    cmd::BlockdevMirrorArguments, BlockdevOnError, DriveMirror, MirrorSyncMode, NewImageMode,
    QapiType,
};

use super::{start, BackingMode, MirrorParams, DEFAULT_BUF_SIZE};
use crate::engine::{Job, JobSpec};
use crate::error::{JobError, Result};
use crate::Jobs;

/// The error policies and job options of the mirror and backup commands.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Policy for read errors (default `report`).
    pub on_source_error: BlockdevOnError,
    /// Policy for write errors (default `report`).
    pub on_target_error: BlockdevOnError,
    /// Rate limit (bytes per second, 0: none).
    pub speed: i64,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
}

impl CopyOptions {
    /// The options from a command's optional arguments, with QEMU's defaults.
    pub fn new(
        on_source_error: &Option<BlockdevOnError>,
        on_target_error: &Option<BlockdevOnError>,
        speed: Option<i64>,
        auto_finalize: Option<bool>,
        auto_dismiss: Option<bool>,
    ) -> Self {
        CopyOptions {
            on_source_error: on_source_error.clone().unwrap_or(BlockdevOnError::Report),
            on_target_error: on_target_error.clone().unwrap_or(BlockdevOnError::Report),
            speed: speed.unwrap_or(0),
            auto_finalize: auto_finalize.unwrap_or(true),
            auto_dismiss: auto_dismiss.unwrap_or(true),
        }
    }

    /// The job's spec: its id, these options and the nodes it works on.
    pub fn spec(&self, id: &str, nodes: Vec<Arc<Node>>) -> JobSpec {
        JobSpec {
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            speed: self.speed,
            nodes,
            ..JobSpec::new(id)
        }
    }

    /// The policy for a failed read (`true`) or write.
    pub fn policy(&self, is_read: bool) -> &BlockdevOnError {
        if is_read {
            &self.on_source_error
        } else {
            &self.on_target_error
        }
    }
}

fn lookup_opt(g: &BlockGraph, name: &Option<String>) -> Result<Option<Arc<Node>>> {
    Ok(match name {
        Some(r) => Some(g.lookup_either(r)?),
        None => None,
    })
}

/// QEMU's default granularity: the target's cluster size clamped to 4 KiB..64 KiB, 64 KiB
/// when the target has no clusters.
pub fn default_granularity(target: &Node) -> u64 {
    match target.driver().image_info().cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// Checks `granularity` and `buf-size` as QEMU does and fills in the defaults.
pub fn check_sizes(
    granularity: Option<u32>,
    buf_size: Option<i64>,
    target: &Node,
) -> Result<(u64, u64)> {
    let g = match granularity {
        None | Some(0) => default_granularity(target),
        Some(g) => {
            let g = g as u64;
            if !(512..=64 << 20).contains(&g) {
                return Err(JobError::generic(
                    "Parameter 'granularity' expects a value in range [512B, 64MB]",
                ));
            }
            if !g.is_power_of_two() {
                return Err(JobError::generic(
                    "Parameter 'granularity' expects a power of 2",
                ));
            }
            g
        }
    };
    let b = match buf_size {
        None | Some(0) => DEFAULT_BUF_SIZE,
        Some(b) if b < 0 => return Err(JobError::generic("Invalid parameter 'buf-size'")),
        Some(b) => b as u64,
    };
    Ok((g, b.max(g)))
}

fn check_sync(sync: &MirrorSyncMode) -> Result<()> {
    match sync {
        MirrorSyncMode::Full | MirrorSyncMode::Top | MirrorSyncMode::None => Ok(()),
        other => Err(JobError::generic(format!(
            "Sync mode '{}' not supported",
            other.as_str()
        ))),
    }
}

/// The format node under implicit filters (QEMU's `bdrv_skip_filters` for what a command
/// reports and creates images from).
pub fn skip_filters(n: &Arc<Node>) -> Arc<Node> {
    let mut cur = n.clone();
    for _ in 0..64 {
        if !cur.driver().is_filter() {
            break;
        }
        match cur.primary_child() {
            Some(c) => cur = c.node(),
            None => break,
        }
    }
    cur
}

/// Opens the target image of `drive-mirror` / `drive-backup`: creates it first unless
/// `mode` is `existing` (format: given, else the source's, else probed for existing
/// images), with the backing file `backing` (a node whose file name and format are
/// recorded). The node is opened without a backing node: the job attaches one.
pub fn open_new_target(
    g: &mut BlockGraph,
    source: &Arc<Node>,
    path: &str,
    format: Option<&str>,
    mode: &NewImageMode,
    backing: Option<&Arc<Node>>,
    node_name: Option<&str>,
) -> Result<Arc<Node>> {
    let src = skip_filters(source);
    let format = match (format, mode) {
        (Some(f), _) => f.to_string(),
        (None, NewImageMode::Existing) => block_graph::drivers::probe_format(path)?.to_string(),
        (None, _) => src.driver_name().to_string(),
    };
    match mode {
        NewImageMode::Existing => {}
        NewImageMode::AbsolutePaths => {
            let b = backing.map(|b| {
                let b = skip_filters(b);
                (block_graph::drivers::node_filename(&b), b.driver_name())
            });
            block_graph::ops::create_image(
                path,
                &format,
                src.length(),
                b.as_ref().map(|(f, d)| (f.as_str(), *d)),
            )?;
        }
        NewImageMode::Unrecognized(m) => {
            return Err(JobError::generic(format!(
                "Parameter 'mode' does not accept value '{m}'"
            )))
        }
    }
    let mut v = serde_json::json!({
        "driver": format,
        "file": {"driver": "file", "filename": path},
    });
    if format == "qcow2" {
        v["backing"] = serde_json::Value::Null;
    }
    if let Some(n) = node_name {
        v["node-name"] = serde_json::Value::String(n.to_string());
    }
    let o = qapi_types::BlockdevOptions::from_qmp_strict(v)
        .map_err(|e| JobError::generic(e.to_string()))?;
    let mut inh = block_graph::options::Inherit::top();
    inh.cache_direct = Some(source.options().cache_direct);
    Ok(g.open_node(&o, &inh, false)?)
}

/// `drive-mirror`: opens (or creates) the target image, then starts the job.
pub fn drive_mirror(g: &mut BlockGraph, jobs: &Jobs, a: &DriveMirror) -> Result<Arc<Job>> {
    check_sync(&a.sync)?;
    let source = g.root_bs(&a.device)?;
    let mode = a.mode.clone().unwrap_or(NewImageMode::AbsolutePaths);
    let job_id = a
        .job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    let src = skip_filters(&source);
    let (sync, backing) = match a.sync {
        MirrorSyncMode::Top => match src.backing() {
            Some(b) => (MirrorSyncMode::Top, Some(b.node())),
            None => (MirrorSyncMode::Full, None),
        },
        MirrorSyncMode::None => (MirrorSyncMode::None, Some(source.clone())),
        _ => (MirrorSyncMode::Full, None),
    };
    if let Some(n) = &a.node_name {
        if g.lookup_either(n).is_ok() {
            return Err(JobError::generic(format!(
                "Duplicate nodes with node-name='{n}'"
            )));
        }
    }
    jobs.check_spec(
        g,
        &JobSpec {
            nodes: vec![source.clone()],
            ..JobSpec::new(job_id.clone())
        },
    )?;
    let target = open_new_target(
        g,
        &source,
        &a.target,
        a.format.as_deref(),
        &mode,
        backing.as_ref(),
        a.node_name.as_deref(),
    )?;
    let (granularity, buf_size) = check_sizes(a.granularity, a.buf_size, &target)?;
    let replaces = lookup_opt(g, &a.replaces)?;
    let backing_mode = if sync == MirrorSyncMode::Full {
        BackingMode::Leave
    } else {
        BackingMode::FromSource
    };
    start(
        g,
        jobs,
        MirrorParams {
            job_id,
            source,
            target,
            replaces,
            sync,
            granularity,
            buf_size,
            unmap: a.unmap.unwrap_or(true),
            backing_mode,
            opts: CopyOptions::new(
                &a.on_source_error,
                &a.on_target_error,
                a.speed,
                a.auto_finalize,
                a.auto_dismiss,
            ),
        },
    )
}

/// `blockdev-mirror`: mirrors to an existing node.
pub fn blockdev_mirror(
    g: &mut BlockGraph,
    jobs: &Jobs,
    a: &BlockdevMirrorArguments,
) -> Result<Arc<Job>> {
    check_sync(&a.sync)?;
    let source = g.root_bs(&a.device)?;
    let target = g.lookup_either(&a.target)?;
    let job_id = a
        .job_id
        .clone()
        .unwrap_or_else(|| g.device_or_node_name(&source));
    let (granularity, buf_size) = check_sizes(a.granularity, a.buf_size, &target)?;
    let replaces = lookup_opt(g, &a.replaces)?;
    let sync = match a.sync {
        MirrorSyncMode::Top if skip_filters(&source).backing().is_none() => MirrorSyncMode::Full,
        ref s => s.clone(),
    };
    start(
        g,
        jobs,
        MirrorParams {
            job_id,
            source,
            target,
            replaces,
            sync,
            granularity,
            buf_size,
            unmap: true,
            backing_mode: BackingMode::Leave,
            opts: CopyOptions::new(
                &a.on_source_error,
                &a.on_target_error,
                a.speed,
                a.auto_finalize,
                a.auto_dismiss,
            ),
        },
    )
}
