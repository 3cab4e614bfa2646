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
    /// A meter; when `enabled` is false nothing is printed. Prints the initial `0.00`.
    pub fn new(enabled: bool) -> Self {
        let p = Progress {
            enabled,
            min_skip: 1.0,
            state: Mutex::new(State {
                current: 0.0,
                last_print: 0.0,
            }),
        };
        p.set(0.0);
        p
    }

    /// Sets the absolute progress in percent and prints it when it moved by more than the
    /// minimum step, reached 100 or is 0 (qemu's `qemu_progress_print(percent, 0)`).
    pub fn set(&self, percent: f32) {
        if !self.enabled || percent.is_nan() {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let current = percent.min(100.0);
        s.current = current;
        if current > s.last_print + self.min_skip || current == 100.0 || current == 0.0 {
            s.last_print = current;
            let mut out = std::io::stdout().lock();
            // A closed stdout must not fail the copy.
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
