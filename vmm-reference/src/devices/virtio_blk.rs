//! The virtio-blk request engine (virtio 1.x, section 5.2): requests popped
//! from a split virtqueue, executed on a block-graph BlockBackend, completed
//! with a status byte.
//!
//! Everything the guest put in the queue is untrusted: headers shorter than
//! 16 bytes, data beyond the disk, descriptors outside guest memory or chains
//! that loop get an error status where one can be written, and otherwise put
//! the device in the NEEDS_RESET state (as QEMU's virtio_error does), never
//! a panic. Data moves through a bounce buffer of at most `MAX_REQUEST`
//! bytes, so a request can't make the VMM allocate what the guest claims.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block_graph::backend::BlockBackend;
use block_graph::stats::{AcctCookie, AcctType};
use block_graph::{BlockError, WriteFlags, ZeroFlags};
use qapi_types::BlockErrorAction;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// The largest data transfer of one request (bounded bounce buffer).
pub const MAX_REQUEST: usize = 4 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Feature bits offered by the device.
pub mod features {
    /// Maximum segments in a request is in config.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size is in config.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Several request queues.
    pub const MQ: u64 = 1 << 12;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Bytes of the device configuration space.
pub const CONFIG_SIZE: usize = 64;
/// Largest number of data segments in a request we accept (config seg_max).
const SEG_MAX: u32 = 126;

/// What serving a queue notification asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Nothing to tell the driver.
    Idle,
    /// Requests completed and the driver wants an interrupt.
    Interrupt,
    /// The driver broke the queue: set NEEDS_RESET and send a config interrupt.
    Broken,
}

/// Why a queue can no longer be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The guest broke the virtqueue protocol; the device needs a reset.
    #[error("the driver broke the virtqueue protocol: {0}")]
    Broken(String),
}

/// How a device asks the VMM to stop the VM after an I/O error whose policy
/// is `stop` (QEMU's `qemu_system_vmstop_request(RUN_STATE_IO_ERROR)`).
///
/// A device may serve its queues on a vCPU thread, which must not wait for
/// the vCPUs to park (it is one of them): the device only raises the request
/// and wakes the main loop, which stops the VM (run state `io-error`, STOP)
/// with [`IoErrorStop::take`].
pub struct IoErrorStop {
    requested: AtomicBool,
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl IoErrorStop {
    /// A request channel; `wake` (if any) wakes whoever acts on it.
    pub fn new(wake: Option<Box<dyn Fn() + Send + Sync>>) -> Arc<Self> {
        Arc::new(IoErrorStop {
            requested: AtomicBool::new(false),
            wake,
        })
    }

    /// Asks for the VM to stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Some(wake) = &self.wake {
            wake();
        }
    }

    /// Takes a pending request: whether the VM must stop.
    pub fn take(&self) -> bool {
        self.requested.swap(false, Ordering::SeqCst)
    }
}

/// How a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Complete it with this status, having written this many data bytes.
    Done(u8, usize),
    /// Keep it: the error policy stopped the VM, and the request runs again
    /// when the VM resumes.
    Keep,
}

/// One virtio-blk disk's request engine.
///
/// It does the device-side accounting of QEMU's virtio-blk on its
/// BlockBackend's statistics (which do not account by themselves): reads
/// as `rd_*`, writes and write-zeroes as `wr_*`, flushes as `flush_*`
/// (discards are not accounted), a request refused before any I/O as
/// `invalid_*`, and one that fails as `failed_*`. It applies the backend's
/// error policy (`werror`, `rerror` for reads) to every failed request:
/// `report` completes it with an I/O error, `ignore` with success, and
/// `stop` keeps it (its queue is not processed any more), asks the VMM to
/// stop the VM, and runs it again on [`BlkEngine::take_held`] (when the VM
/// resumes).
pub struct BlkEngine {
    backend: Arc<BlockBackend>,
    read_only: bool,
    serial: String,
    buf: Vec<u8>,
    /// Queues whose first available request is kept for a retry.
    held: Vec<u16>,
    stop: Arc<IoErrorStop>,
}

impl BlkEngine {
    /// An engine over `backend`; `serial` answers GET_ID (at most 20 bytes
    /// sent). As QEMU's virtio-blk, it enables the backend's I/O status.
    pub fn new(backend: Arc<BlockBackend>, read_only: bool, serial: &str) -> Self {
        backend.iostatus_enable();
        BlkEngine {
            backend,
            read_only,
            serial: serial.to_owned(),
            buf: Vec::new(),
            held: Vec::new(),
            stop: IoErrorStop::new(None),
        }
    }

    /// Where the engine asks for the VM to stop (werror/rerror=stop); by
    /// default a request nobody acts on.
    pub fn set_io_error_stop(&mut self, stop: Arc<IoErrorStop>) {
        self.stop = stop;
    }

    /// The disk size in sectors.
    pub fn capacity(&self) -> u64 {
        self.backend.length() / SECTOR
    }

    /// The features this disk offers.
    pub fn features(&self, queues: u16) -> u64 {
        let mut f = features::VERSION_1
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::DISCARD
            | features::WRITE_ZEROES;
        if queues > 1 {
            f |= features::MQ;
        }
        if self.read_only {
            f |= features::RO;
        }
        f
    }

    /// The device configuration space (struct virtio_blk_config): capacity,
    /// seg_max, blk_size, num_queues, and the discard and write-zeroes limits.
    pub fn config_space(&self, queues: u16) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&queues.to_le_bytes());
        let max_sectors = (MAX_REQUEST as u64 / SECTOR) as u32;
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Serves a notification of queue `index`: processes what is available
    /// and says whether the driver must be interrupted. A queue that is not
    /// ready (or not valid in guest memory), or that holds a request kept
    /// by the `stop` error policy, is left alone.
    pub fn serve(&mut self, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) -> Served {
        if !queue.ready() || !queue.is_valid(mem) {
            return Served::Idle;
        }
        match self.process_queue(index, queue, mem) {
            Ok(0) => Served::Idle,
            Ok(_) if queue.needs_notification(mem).unwrap_or(true) => Served::Interrupt,
            Ok(_) => Served::Idle,
            Err(QueueError::Broken(why)) => {
                log::warn!("virtio-blk: {why}: the device needs a reset");
                Served::Broken
            }
        }
    }

    /// Whether queue `index` holds a request kept for a retry.
    pub fn is_held(&self, index: u16) -> bool {
        self.held.contains(&index)
    }

    /// The queues holding a kept request, which are processed again from
    /// now on: the transport serves each of them (the kept request first),
    /// as QEMU's virtio_blk_dma_restart_cb does when the VM resumes.
    pub fn take_held(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.held)
    }

    /// The device was reset: the kept requests are dropped (QEMU's
    /// virtio_blk_reset), their queues are gone with them.
    pub fn reset(&mut self) {
        self.held.clear();
    }

    /// Processes every available request of `queue` as queue 0; returns
    /// how many completed. See [`BlkEngine::process_queue`].
    // Used by the tests and benches/virtio_blk.rs, not by the VMM itself.
    #[allow(dead_code)]
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, QueueError> {
        self.process_queue(0, queue, mem)
    }

    /// Processes the available requests of queue `index`; returns how many
    /// completed. The caller notifies the driver when the queue says so.
    /// A request the `stop` error policy keeps is put back at the head of
    /// the available ring (as QEMU's virtqueue_unpop) and ends the
    /// processing: the queue holds it until [`BlkEngine::take_held`].
    pub fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        while !self.is_held(index) {
            let chain = {
                let mut iter = queue
                    .iter(mem)
                    .map_err(|e| QueueError::Broken(e.to_string()))?;
                match iter.next() {
                    Some(c) => c,
                    None => break,
                }
            };
            let head = chain.head_index();
            let mut reader = chain
                .clone()
                .reader(mem)
                .map_err(|e| QueueError::Broken(format!("request {head}: {e}")))?;
            let mut writer = chain
                .writer(mem)
                .map_err(|e| QueueError::Broken(format!("request {head}: {e}")))?;
            // The header: type, reserved, sector.
            if reader.available_bytes() < 16 || writer.available_bytes() < 1 {
                return Err(QueueError::Broken(format!(
                    "request {head}: no room for the header or the status byte"
                )));
            }
            let mut header = [0u8; 16];
            reader
                .read_exact(&mut header)
                .map_err(|e| QueueError::Broken(format!("request {head}: header: {e}")))?;
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            // The status byte is the last writable byte; data comes before it.
            let data_in = writer.available_bytes() - 1;
            let mut status_writer = writer
                .split_at(data_in)
                .map_err(|e| QueueError::Broken(format!("request {head}: status: {e}")))?;
            let (status, written) =
                match self.execute(kind, sector, &mut reader, &mut writer, data_in) {
                    Outcome::Done(status, written) => (status, written),
                    Outcome::Keep => {
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        self.held.push(index);
                        log::info!(
                            "virtio-blk {}: request {head} kept for a retry, stopping the VM",
                            self.backend.name()
                        );
                        self.stop.request();
                        break;
                    }
                };
            status_writer
                .write_all(&[status])
                .map_err(|e| QueueError::Broken(format!("request {head}: status: {e}")))?;
            queue
                .add_used(mem, head, written as u32 + 1)
                .map_err(|e| QueueError::Broken(e.to_string()))?;
            done += 1;
        }
        Ok(done)
    }

    /// A request that reached the BlockBackend failed with `err`: the
    /// backend's policy (QEMU's virtio_blk_handle_rw_error) reports it to
    /// the guest (accounted as failed), ignores it (completed, accounted as
    /// done) or stops the VM (kept, its accounting dropped: the retry is
    /// accounted anew). `cookie` is `None` for discards (not accounted).
    fn io_failed(&self, is_read: bool, err: &BlockError, cookie: Option<AcctCookie>) -> Outcome {
        let action = self.backend.io_error(is_read, err);
        log::debug!(
            "virtio-blk {}: {} error: {err}: {action:?}",
            self.backend.name(),
            if is_read { "read" } else { "write" }
        );
        match action {
            BlockErrorAction::Stop => Outcome::Keep,
            BlockErrorAction::Ignore => {
                if let Some(c) = cookie {
                    self.backend.stats().done(c, true);
                }
                Outcome::Done(S_OK, 0)
            }
            _ => {
                if let Some(c) = cookie {
                    self.backend.stats().done(c, false);
                }
                Outcome::Done(S_IOERR, 0)
            }
        }
    }

    /// A request refused before any I/O (QEMU's block_acct_invalid).
    fn invalid(&self, ty: AcctType) -> Outcome {
        self.backend.stats().invalid(ty);
        Outcome::Done(S_IOERR, 0)
    }

    fn execute(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
        data_in: usize,
    ) -> Outcome {
        let capacity = self.capacity();
        let in_range = |len: usize| {
            let sectors = (len as u64).div_ceil(SECTOR);
            sector
                .checked_add(sectors)
                .is_some_and(|end| end <= capacity)
        };
        let stats = self.backend.stats();
        match kind {
            T_IN => {
                if data_in > MAX_REQUEST || data_in as u64 % SECTOR != 0 || !in_range(data_in) {
                    return self.invalid(AcctType::Read);
                }
                self.buf.resize(data_in, 0);
                let c = stats.start(AcctType::Read, data_in as u64);
                if let Err(e) = self.backend.read_buf(sector * SECTOR, &mut self.buf) {
                    return self.io_failed(true, &e, Some(c));
                }
                let ok = writer.write_all(&self.buf).is_ok();
                stats.done(c, ok);
                if ok {
                    Outcome::Done(S_OK, data_in)
                } else {
                    Outcome::Done(S_IOERR, 0)
                }
            }
            T_OUT => {
                let len = reader.available_bytes();
                if self.read_only || len > MAX_REQUEST || len as u64 % SECTOR != 0 || !in_range(len)
                {
                    return self.invalid(AcctType::Write);
                }
                self.buf.resize(len, 0);
                if reader.read_exact(&mut self.buf).is_err() {
                    return Outcome::Done(S_IOERR, 0);
                }
                let c = stats.start(AcctType::Write, len as u64);
                match self
                    .backend
                    .write_buf(sector * SECTOR, &self.buf, WriteFlags::default())
                {
                    Ok(()) => {
                        stats.done(c, true);
                        Outcome::Done(S_OK, 0)
                    }
                    Err(e) => self.io_failed(false, &e, Some(c)),
                }
            }
            T_FLUSH => {
                let c = stats.start(AcctType::Flush, 0);
                match self.backend.flush() {
                    Ok(()) => {
                        stats.done(c, true);
                        Outcome::Done(S_OK, 0)
                    }
                    Err(e) => self.io_failed(false, &e, Some(c)),
                }
            }
            T_GET_ID => {
                let mut id = [0u8; 20];
                let n = self.serial.len().min(20);
                id[..n].copy_from_slice(&self.serial.as_bytes()[..n]);
                let n = data_in.min(20);
                match writer.write_all(&id[..n]) {
                    Ok(()) => Outcome::Done(S_OK, n),
                    Err(_) => Outcome::Done(S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => self.discard_or_zero(kind == T_WRITE_ZEROES, reader),
            _ => Outcome::Done(S_UNSUPP, 0),
        }
    }

    /// Discard or write-zeroes: segments of sector u64, num_sectors u32,
    /// flags u32. Write-zeroes is accounted as a write, discard not at all
    /// (as QEMU's virtio_blk_handle_discard_write_zeroes); both follow
    /// `werror` when they fail.
    fn discard_or_zero(&mut self, zeroes: bool, reader: &mut virtio_queue::Reader<'_>) -> Outcome {
        let refuse = |e: &Self| {
            if zeroes {
                e.invalid(AcctType::Write)
            } else {
                Outcome::Done(S_IOERR, 0)
            }
        };
        if self.read_only {
            return refuse(self);
        }
        let capacity = self.capacity();
        let stats = self.backend.stats();
        let mut seg = [0u8; 16];
        let mut status = S_OK;
        while reader.available_bytes() >= 16 {
            if reader.read_exact(&mut seg).is_err() {
                return Outcome::Done(S_IOERR, 0);
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let count = u64::from(u32::from_le_bytes(
                seg[8..12].try_into().unwrap_or_default(),
            ));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let Some(end) = start.checked_add(count).filter(|&e| e <= capacity) else {
                return refuse(self);
            };
            let (off, len) = (start * SECTOR, (end - start) * SECTOR);
            let outcome = if zeroes {
                let zf = ZeroFlags {
                    may_unmap: flags & 1 != 0,
                    ..Default::default()
                };
                let c = stats.start(AcctType::Write, len);
                match self.backend.write_zeroes(off, len, zf) {
                    Ok(()) => {
                        stats.done(c, true);
                        Outcome::Done(S_OK, 0)
                    }
                    Err(e) => self.io_failed(false, &e, Some(c)),
                }
            } else {
                match self.backend.discard(off, len) {
                    Ok(()) => Outcome::Done(S_OK, 0),
                    Err(e) => self.io_failed(false, &e, None),
                }
            };
            match outcome {
                Outcome::Keep => return Outcome::Keep,
                Outcome::Done(S_OK, _) => {}
                Outcome::Done(s, _) => status = s,
            }
        }
        Outcome::Done(status, 0)
    }
}

#[cfg(test)]
#[path = "virtio_blk_errors_tests.rs"]
mod errors_tests;

#[cfg(test)]
#[path = "virtio_blk_tests.rs"]
pub(crate) mod tests;
