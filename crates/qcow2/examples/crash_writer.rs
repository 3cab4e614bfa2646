//! The writer half of the crash-safety test (`tests/crash.rs`): writes to an image until it is
//! killed, recording in a journal file how many writes a completed flush covered.
//!
//! Usage: `crash_writer IMAGE JOURNAL SEED`
//!
//! Writes go to a log area (write `i` at a deterministic offset with deterministic data, never
//! overwritten) and to a scratch area (random overwrites, write-zeroes, discards and compressed
//! writes that exercise COW and freeing). After every few writes it flushes and appends the
//! number of log writes the flush covered to the journal, then fsyncs the journal.

use std::io::Write;
use std::sync::Arc;

use qcow2::{FollowFiles, OpenOptions, Qcow2};

/// Offset and length of log write `i` (shared with the test).
pub fn log_extent(i: u64) -> (u64, u64) {
    let len = 512 + (i * 7919 % 9) * 1536;
    (i * 16384 + (i % 5) * 512, len)
}

/// Data of log write `i`.
pub fn log_data(i: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|k| (i as u8) ^ (k as u8).wrapping_mul(31) ^ 0x5a)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: crash_writer IMAGE JOURNAL SEED");
        std::process::exit(2);
    }
    let mut seed: u64 = args[3].parse().expect("seed");
    let img = Qcow2::open_path(
        &args[1],
        OpenOptions {
            writable: true,
            l2_cache_size: Some(16384),
            refcount_cache_size: Some(16384),
            opener: Arc::new(FollowFiles::default()),
            ..Default::default()
        },
    )
    .expect("open");
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&args[2])
        .expect("journal");
    let size = img.size();
    let half = size / 2;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut i = 0u64;
    loop {
        let (off, len) = log_extent(i);
        if off + len > half {
            // Log area full: keep churning the scratch area only.
            std::thread::sleep(std::time::Duration::from_millis(1));
        } else {
            img.write_at(&log_data(i, len), off).expect("log write");
            i += 1;
        }
        // Scratch area.
        let so = half + rnd() % (half - 200_000);
        let sl = 1 + rnd() % 150_000;
        match rnd() % 8 {
            0 => img.write_zeroes(so, sl, rnd() % 2 == 0).expect("zeroes"),
            1 => img.discard(so, sl).expect("discard"),
            2 => {
                let cs = img.cluster_size();
                let c = so / cs * cs;
                let buf = vec![(rnd() % 7) as u8; cs as usize];
                img.write_compressed(&buf, c).expect("compressed");
            }
            _ => {
                let b = (rnd() & 0xff) as u8;
                img.write_at(&vec![b; sl as usize], so).expect("scratch");
            }
        }
        if i % 8 == 0 {
            img.flush().expect("flush");
            // One write(2) for the whole line: `writeln!` writes the number and the newline
            // separately, and a kill between them left a torn line for the next round's
            // number to be appended to ("200" then "8" read as 2008).
            journal
                .write_all(format!("{i}\n").as_bytes())
                .expect("journal write");
            journal.sync_data().expect("journal sync");
        }
    }
}
