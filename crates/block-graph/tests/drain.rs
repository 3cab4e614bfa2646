//! Drained sections: requests in flight finish, new ones wait, and owners of roots that
//! issue requests on their own are asked to stop first.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block_graph::{BlockGraph, DrainParticipant, WriteFlags};
use common::*;
use serde_json::json;

#[test]
fn drain_waits_for_in_flight_and_holds_new_requests() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "null-co", "node-name": "n", "latency-ns": 20_000_000}),
        ))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let b2 = be.clone();
    let t = std::thread::spawn(move || {
        for _ in 0..3 {
            b2.write_buf(0, &[0; 512], WriteFlags::default()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(5));
    let started = Instant::now();
    let d = g.drain(std::slice::from_ref(&n));
    assert_eq!(n.in_flight(), 0);
    // One 20 ms request in flight: the drain returns once it is done (a loaded machine
    // may take its time; a drain that waited for held requests would never return).
    assert!(started.elapsed() < Duration::from_secs(2));
    // A new request waits while drained.
    let done = Arc::new(AtomicBool::new(false));
    let (b3, d3) = (be.clone(), done.clone());
    let t2 = std::thread::spawn(move || {
        b3.read_buf(0, &mut [0u8; 512]).unwrap();
        d3.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(60));
    assert!(!done.load(Ordering::SeqCst), "held while drained");
    assert_eq!(n.in_flight(), 0);
    drop(d);
    t2.join().unwrap();
    t.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn drain_waits_for_requests_made_through_a_root_edge() {
    // Jobs and temporary users issue requests through their root edge directly, not
    // through BlockBackend's methods: those are counted at the root's gate too, so that a
    // drain waits for them.
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "null-co", "node-name": "n", "latency-ns": 10_000_000_000u64}),
        ))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    let edge = be.root_edge().unwrap();
    let t = std::thread::spawn(move || edge.read_buf(0, &mut [0u8; 512]));
    let started = Instant::now();
    while n.in_flight() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a request through a root edge is not counted"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The drain waits for it (and ends its emulated latency early).
    let d = g.drain(std::slice::from_ref(&n));
    assert_eq!(n.in_flight(), 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(d);
    assert!(t.join().unwrap().is_ok());
}

#[test]
fn a_drain_ends_emulated_latency_early() {
    // latency-ns takes any 64-bit value; a request sleeping for it must not hold a drain
    // (and the monitor doing it) for as long: the null driver ends its wait when drained.
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(
            json!({"driver": "null-co", "node-name": "n", "latency-ns": u64::MAX}),
        ))
        .unwrap();
    let be = g.create_backend("d", Some(&n), Default::default()).unwrap();
    g.attach_device(&be, disk("vd")).unwrap();
    let b2 = be.clone();
    let t = std::thread::spawn(move || b2.write_buf(0, &[0; 512], WriteFlags::default()));
    while n.in_flight() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    let d = g.drain(std::slice::from_ref(&n));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(n.in_flight(), 0);
    drop(d);
    assert!(t.join().unwrap().is_ok());
}

#[test]
fn emulated_latency_is_bounded_for_the_monitors_own_flushes() {
    // The monitor flushes nodes itself (snapshots, quit), outside any drain: a latency of
    // centuries must not stop it answering.
    let mut g = BlockGraph::new();
    g.blockdev_add(&opts(
        json!({"driver": "null-co", "node-name": "n", "latency-ns": u64::MAX}),
    ))
    .unwrap();
    let started = Instant::now();
    g.flush_all().unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A root owner that stays busy for a while after being told to stop, like a job finishing
/// its current chunk.
struct SlowToStop {
    calls: Mutex<Vec<&'static str>>,
    busy_polls: AtomicU32,
}

impl DrainParticipant for SlowToStop {
    fn drained_begin(&self) {
        self.calls.lock().unwrap().push("begin");
    }
    fn drained_poll(&self) -> bool {
        // Busy for the first five polls after the section began.
        self.busy_polls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
    fn drained_end(&self) {
        self.calls.lock().unwrap().push("end");
    }
}

#[test]
fn a_drain_asks_the_owners_of_roots_above_to_stop_and_waits_for_them() {
    let mut g = BlockGraph::new();
    let n = g
        .blockdev_add(&opts(json!({"driver": "null-co", "node-name": "n"})))
        .unwrap();
    let other = g
        .blockdev_add(&opts(json!({"driver": "null-co", "node-name": "other"})))
        .unwrap();
    let root = g
        .new_root(&n, block_graph::Perm::NONE, block_graph::Perm::ALL, "a job")
        .unwrap();
    let p = Arc::new(SlowToStop {
        calls: Mutex::new(Vec::new()),
        busy_polls: AtomicU32::new(5),
    });
    let dynp: Arc<dyn DrainParticipant> = p.clone();
    root.root_info()
        .set_drain_participant(Arc::downgrade(&dynp));
    // A drain of a node the root does not reach leaves the owner alone.
    drop(g.drain(std::slice::from_ref(&other)));
    assert!(p.calls.lock().unwrap().is_empty());
    // A drain below the root: told to stop, waited for until no longer busy, told to go on.
    let d = g.drain(std::slice::from_ref(&n));
    assert_eq!(
        p.busy_polls.load(Ordering::SeqCst),
        0,
        "the drain polled until idle"
    );
    assert_eq!(*p.calls.lock().unwrap(), ["begin"]);
    drop(d);
    assert_eq!(*p.calls.lock().unwrap(), ["begin", "end"]);
    // Once the owner is gone, drains no longer ask it.
    drop(dynp);
    drop(p);
    drop(g.drain(std::slice::from_ref(&n)));
    g.release_root(&root);
}
