//! vCPU threads: the KVM_RUN loop, port I/O dispatch, and the pause
//! protocol that lets `stop` return only when every vCPU is parked.
//!
//! Pausing sets the wanted state and kicks each thread out of KVM_RUN with
//! a real-time signal whose handler does nothing (KVM_RUN then returns
//! EINTR); the kick repeats every millisecond until every thread has
//! parked, so a signal that lands just before a thread enters KVM_RUN
//! cannot leave it running.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::bus::IoBus;

/// Puts vCPU `index` in its power-on state (at start and after a reset).
pub type BootFn = dyn Fn(&VcpuFd, usize) -> Result<(), kvm_ioctls::Error> + Send + Sync;

/// What the vCPU threads should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Inner {
    want: Want,
    parked: usize,
    /// Bumped by a reset: each vCPU reloads its boot registers when it sees a new value.
    reset_generation: u64,
    /// Bumped by inject-nmi: each vCPU injects one NMI when it sees a new value.
    nmi_generation: u64,
}

/// What each vCPU publishes for `query-cpus` and `query-cpus-fast`.
#[derive(Debug, Default)]
pub struct VcpuInfo {
    /// The host thread id (gettid) of the vCPU thread.
    pub thread_id: AtomicI64,
    /// The guest's instruction pointer when the vCPU last parked.
    pub pc: AtomicU64,
    /// CR0, CR3, CR4 and EFER when the vCPU last parked (for translating
    /// guest-virtual addresses, as memsave needs).
    pub paging: [AtomicU64; 4],
}

struct Shared {
    inner: Mutex<Inner>,
    cv: Condvar,
}

/// The vCPU threads of a machine.
pub struct Vcpus {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    info: Vec<Arc<VcpuInfo>>,
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a sigaction with a handler that does nothing (async-signal
        // safe), no SA_RESTART so that KVM_RUN returns EINTR; the struct is
        // zero-initialised as sigaction(2) allows.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl Vcpus {
    /// Starts one thread per vCPU, paused when `paused` (as with `-S`).
    pub fn spawn(
        fds: Vec<VcpuFd>,
        bus: Arc<IoBus>,
        paused: bool,
        boot: Arc<BootFn>,
    ) -> std::io::Result<Vcpus> {
        install_kick_handler();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                want: if paused { Want::Pause } else { Want::Run },
                parked: 0,
                reset_generation: 0,
                nmi_generation: 0,
            }),
            cv: Condvar::new(),
        });
        let mut threads = Vec::new();
        let mut info = Vec::new();
        for (index, fd) in fds.into_iter().enumerate() {
            let vinfo = Arc::new(VcpuInfo::default());
            let (shared, bus, boot, vinfo2) =
                (shared.clone(), bus.clone(), boot.clone(), vinfo.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn(move || vcpu_loop(fd, index, &shared, &bus, &*boot, &vinfo2))?,
            );
            info.push(vinfo);
        }
        let v = Vcpus {
            shared,
            threads,
            info,
        };
        if paused {
            v.wait_parked();
        }
        Ok(v)
    }

    /// Published state of every vCPU.
    pub fn info(&self) -> &[Arc<VcpuInfo>] {
        &self.info
    }

    fn kick(&self) {
        for t in &self.threads {
            // SAFETY: pthread_kill on a thread we own and have not joined;
            // the signal's handler does nothing.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }

    fn wait_parked(&self) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        while g.parked < self.threads.len() {
            drop(g);
            self.kick();
            g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (ng, _) = self
                .shared
                .cv
                .wait_timeout(g, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
            g = ng;
        }
    }

    /// Stops every vCPU; returns once all are parked outside KVM_RUN.
    pub fn pause(&self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .want = Want::Pause;
        self.wait_parked();
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// Makes every vCPU reload its power-on state before it runs again.
    pub fn request_reset(&self) {
        let mut g = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.reset_generation += 1;
    }

    /// Delivers an NMI to every vCPU (each injects it before it runs again).
    pub fn request_nmi(&self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nmi_generation += 1;
        self.kick();
    }

    /// Stops and joins every thread.
    pub fn shutdown(&mut self) {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .want = Want::Exit;
        self.shared.cv.notify_all();
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn vcpu_loop(
    mut vcpu: VcpuFd,
    index: usize,
    shared: &Shared,
    bus: &IoBus,
    boot: &BootFn,
    info: &VcpuInfo,
) {
    // SAFETY: gettid has no preconditions.
    info.thread_id
        .store(i64::from(unsafe { libc::gettid() }), Ordering::Relaxed);
    let mut generation = u64::MAX;
    let mut nmis = 0u64;
    loop {
        {
            let mut g = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.want == Want::Pause {
                if let Ok(regs) = vcpu.get_regs() {
                    info.pc.store(regs.rip, Ordering::Relaxed);
                }
                if let Ok(sregs) = vcpu.get_sregs() {
                    for (slot, v) in info
                        .paging
                        .iter()
                        .zip([sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer])
                    {
                        slot.store(v, Ordering::Relaxed);
                    }
                }
                g.parked += 1;
                shared.cv.notify_all();
                while g.want == Want::Pause {
                    g = shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                g.parked -= 1;
            }
            if g.want == Want::Exit {
                return;
            }
            if g.nmi_generation != nmis {
                nmis = g.nmi_generation;
                if let Err(e) = vcpu.nmi() {
                    log::warn!("vCPU {index}: NMI: {e}");
                }
            }
            if g.reset_generation != generation {
                generation = g.reset_generation;
                if let Err(e) = boot(&vcpu, index) {
                    log::error!("vCPU boot state: {e}");
                    bus.request_shutdown();
                    return;
                }
            }
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => std::thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: QEMU resets the machine.
                log::info!("guest triple fault: resetting");
                bus.request_reset();
                park_until_told(shared);
            }
            Ok(exit) => log::debug!("unhandled vCPU exit {exit:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                log::error!("KVM_RUN failed: {e}");
                bus.request_shutdown();
                park_until_told(shared);
            }
        }
    }
}

/// Waits for the main loop to act on a request (it pauses, then resumes or exits).
fn park_until_told(shared: &Shared) {
    let mut g = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
    while g.want == Want::Run {
        let (ng, _) = shared
            .cv
            .wait_timeout(g, Duration::from_millis(10))
            .unwrap_or_else(|e| e.into_inner());
        g = ng;
    }
}
