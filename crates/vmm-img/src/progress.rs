//! `-p`: progress output as qemu-img prints it (`    (12.34/100%)\r`, a newline at the end).

use std::io::Write;
use std::sync::Mutex;

struct State {
    current: f32,
    last_print: f32,
}

/// A progress meter shared by the workers of one command.
pub struct Progress {
    enabled: bool,
    /// Print only after this many percent of progress (qemu-img uses 1.0).
    min_skip: f32,
    state: Mutex<State>,
}

impl Progress {
    /// A meter printing after every `min_skip` percent of progress (qemu's
    /// `qemu_progress_init`); when `enabled` is false nothing is printed.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        Progress {
            enabled,
            min_skip,
            state: Mutex::new(State {
                current: 0.0,
                last_print: 0.0,
            }),
        }
    }

    /// Prints the initial `0.00` (qemu's `qemu_progress_print(0, 100)`).
    pub fn start(&self) {
        self.add(0.0, 100.0);
    }

    /// Sets the absolute progress in percent (qemu's `qemu_progress_print(percent, 0)`).
    pub fn set(&self, percent: f32) {
        self.update(|_| percent);
    }

    /// Adds `delta` percent of `max` percent (qemu's `qemu_progress_print(delta, max)`).
    pub fn add(&self, delta: f32, max: f32) {
        self.update(|cur| cur + delta / 100.0 * max);
    }

    /// Moves the progress and prints it when it moved by more than the minimum step since the
    /// last print, or reached 100 or 0.
    fn update(&self, f: impl FnOnce(f32) -> f32) {
        if !self.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let current = f(s.current);
        if current.is_nan() {
            return;
        }
        let current = current.min(100.0);
        s.current = current;
        if current > s.last_print + self.min_skip || current == 100.0 || current == 0.0 {
            s.last_print = current;
            let mut out = std::io::stdout().lock();
            // A closed stdout must not fail the command.
            let _ = write!(out, "    ({current:3.2}/100%)\r");
            let _ = out.flush();
        }
    }

    /// Ends the output line.
    pub fn end(&self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}
