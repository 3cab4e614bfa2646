//! The `blkdebug` filter: injects errors into the requests that reach it, driven by the
//! events its parents raise (QEMU's `block/blkdebug.c`).
//!
//! A state machine starts in state 1. When an event arrives (`read_aio` from a `raw` or
//! `qcow2` parent before it reads data, `write_aio` before it writes, `read_backing_aio`,
//! `pwritev`/`pwritev_zero`/`pwritev_done` from the generic layer around writes to this
//! node, `flush_to_os`/`flush_to_disk` from a parent's flush), the `set-state` rules for it
//! (in the current state, or any state when theirs is 0) move the state, and its
//! `inject-error` rules become the active rules. While a rule is active, every request
//! touching its sector (or any request, for sector -1) fails with its errno; a `once` rule
//! deactivates after one error. Flushes only fail for sector -1 rules.
//!
//! The qcow2 crate does not raise metadata events (`l2_load`, `refblock_alloc`, ...):
//! rules for them are accepted and never fire.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};

use qapi_types::{BlkdebugEvent, BlockdevOptionsBlkdebug};

use super::OpenCtx;
use crate::driver::{BlockDriver, DriverImageInfo, DriverStatus, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use crate::iov::{iov_len, iov_len_mut};
use crate::node::{mlock, Edge};
use crate::perm::ChildRole;

#[derive(Debug, Clone)]
enum Action {
    Inject { errno: i32, sector: i64, once: bool },
    SetState(i64),
}

#[derive(Debug, Clone)]
struct Rule {
    id: usize,
    event: BlkdebugEvent,
    state: i64,
    action: Action,
}

#[derive(Debug)]
struct State {
    state: i64,
    rules: Vec<Rule>,
    /// Active injection rules (ids), most recently activated first.
    active: Vec<usize>,
}

/// Live blkdebug nodes: while there are none, parents skip raising debug events.
pub(crate) static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The blkdebug driver's state.
pub struct BlkdebugDriver {
    image: Arc<Edge>,
    state: Mutex<State>,
    given: Vec<(&'static str, serde_json::Value)>,
}

/// Opens a blkdebug node.
pub(crate) fn open(
    ctx: &mut OpenCtx<'_>,
    o: &BlockdevOptionsBlkdebug,
) -> Result<Box<dyn BlockDriver>> {
    if let Some(c) = &o.config {
        return Err(BlockError::generic(format!(
            "Could not read blkdebug config file '{c}': configuration files are not supported, \
             use inject-error and set-state"
        )));
    }
    if let Some(a) = o.align {
        if a < 0 || a >= i32::MAX as i64 || (a != 0 && !(a as u64).is_power_of_two()) {
            return Err(BlockError::generic(format!(
                "Cannot meet constraints with align {a}"
            )));
        }
    }
    let mut rules = Vec::new();
    for r in o.inject_error.iter().flatten() {
        let errno = r.errno.unwrap_or(libc::EIO as i64);
        if errno <= 0 || errno > 4095 {
            return Err(BlockError::generic(format!("Invalid errno {errno}")));
        }
        rules.push(Rule {
            id: rules.len(),
            event: r.event.clone(),
            state: r.state.unwrap_or(0),
            action: Action::Inject {
                errno: errno as i32,
                sector: r.sector.unwrap_or(-1),
                once: r.once.unwrap_or(false),
            },
        });
    }
    for r in o.set_state.iter().flatten() {
        rules.push(Rule {
            id: rules.len(),
            event: r.event.clone(),
            state: r.state.unwrap_or(0),
            action: Action::SetState(r.new_state),
        });
    }
    let image = ctx.open_child("image", &o.image, ChildRole::Filtered)?;
    let mut given = Vec::new();
    if let Some(a) = o.align {
        given.push(("align", serde_json::json!(a)));
    }
    if let Some(v) = &o.inject_error {
        given.push(("inject-error", qapi_types::QapiType::to_qmp(v)));
    }
    if let Some(v) = &o.set_state {
        given.push(("set-state", qapi_types::QapiType::to_qmp(v)));
    }
    LIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(Box::new(BlkdebugDriver {
        image,
        state: Mutex::new(State {
            state: 1,
            rules,
            active: Vec::new(),
        }),
        given,
    }))
}

impl Drop for BlkdebugDriver {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl BlkdebugDriver {
    /// The current state (for tests).
    pub fn current_state(&self) -> i64 {
        mlock(&self.state).state
    }

    /// Fails the request if an active rule covers it.
    fn check(&self, offset: u64, len: u64, flush: bool) -> Result<()> {
        let mut s = mlock(&self.state);
        let hit = s.active.iter().position(|id| {
            let Some(Rule {
                action: Action::Inject { sector, .. },
                ..
            }) = s.rules.iter().find(|r| r.id == *id)
            else {
                return false;
            };
            if *sector == -1 {
                return true;
            }
            if flush || *sector < 0 {
                return false;
            }
            let at = *sector as u64 * 512;
            at >= offset && at < offset + len.max(1)
        });
        let Some(pos) = hit else { return Ok(()) };
        let id = s.active[pos];
        let Some(Action::Inject { errno, once, .. }) = s
            .rules
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.action.clone())
        else {
            return Ok(());
        };
        if once {
            s.active.remove(pos);
            s.rules.retain(|r| r.id != id);
        }
        Err(BlockError::errno(errno))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn length(&self) -> Result<u64> {
        Ok(self.image.length())
    }

    fn read(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.check(offset, iov_len_mut(iov) as u64, false)?;
        self.image.read(offset, iov)
    }

    fn write(&self, offset: u64, iov: &[IoSlice<'_>], flags: WriteFlags) -> Result<()> {
        self.check(offset, iov_len(iov) as u64, false)?;
        self.image.write(offset, iov, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(offset, len, false)?;
        self.image.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, false)?;
        self.image.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.check(0, 0, true)?;
        self.image.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<DriverStatus> {
        Ok(DriverStatus::delegate(&self.image, offset, len))
    }

    fn truncate(&self, len: u64) -> Result<()> {
        self.image.truncate(len)
    }

    fn strong_options(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.given.clone()
    }

    fn filename(&self) -> Option<String> {
        // QEMU's blkdebug_refresh_filename: without options of its own, the node is named
        // by its (empty) config file and its image's plain name.
        if !self.given.is_empty() {
            return None;
        }
        let image = crate::filename::node_filename(&self.image.node());
        (!image.is_empty() && !image.starts_with("json:")).then(|| format!("blkdebug::{image}"))
    }

    fn image_info(&self) -> DriverImageInfo {
        super::info_of_child(&self.image)
    }

    fn snapshot_goto(&self, id_or_name: &str) -> Result<()> {
        super::snapshot_goto(&self.image.node(), id_or_name)
    }

    fn debug_event(&self, ev: &BlkdebugEvent) {
        let mut s = mlock(&self.state);
        let cur = s.state;
        let mut new_state = cur;
        let mut injected = false;
        let matching: Vec<Rule> = s
            .rules
            .iter()
            .filter(|r| &r.event == ev && (r.state == 0 || r.state == cur))
            .cloned()
            .collect();
        for r in matching {
            match r.action {
                Action::Inject { .. } => {
                    if !injected {
                        s.active.clear();
                        injected = true;
                    }
                    s.active.insert(0, r.id);
                }
                Action::SetState(n) => new_state = n,
            }
        }
        s.state = new_state;
    }
}
