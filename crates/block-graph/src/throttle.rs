//! I/O throttling at the BlockBackend (`block_set_io_throttle`): QEMU's leaky buckets
//! (`util/throttle.c`) for bytes and operations, total/read/write, each with an average
//! rate, an optional burst rate and burst length; `iops_size` turns large requests into
//! several operations. Backends in the same named group share the buckets.
//!
//! A request that must wait sleeps on its own thread (no timer thread, no global lock: one
//! mutex per group, held only to update the buckets). While the backend is drained, waiting
//! requests pass unthrottled, as in QEMU, so that drain completes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use qapi_types::runtime::{DecodeError, Decoder, Object};
use qapi_types::QapiType;
use serde_json::Value;

use crate::error::{BlockError, Result};
use crate::node::mlock;

/// QEMU's `THROTTLE_VALUE_MAX`.
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One bucket's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLimit {
    /// Average rate (units per second; 0: unlimited).
    pub avg: u64,
    /// Burst rate (0: none).
    pub max: u64,
    /// Seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// The limits of a throttle group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThrottleLimits {
    /// Bytes per second, both directions.
    pub bps_total: BucketLimit,
    /// Bytes per second, reads.
    pub bps_read: BucketLimit,
    /// Bytes per second, writes.
    pub bps_write: BucketLimit,
    /// Operations per second, both directions.
    pub iops_total: BucketLimit,
    /// Operations per second, reads.
    pub iops_read: BucketLimit,
    /// Operations per second, writes.
    pub iops_write: BucketLimit,
    /// Bytes that count as one operation (0: every request is one).
    pub iops_size: u64,
    /// The group's name.
    pub group: String,
}

impl ThrottleLimits {
    fn buckets(&self) -> [&BucketLimit; 6] {
        [
            &self.bps_total,
            &self.bps_read,
            &self.bps_write,
            &self.iops_total,
            &self.iops_read,
            &self.iops_write,
        ]
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.buckets().iter().any(|b| b.avg > 0)
    }

    /// QEMU's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> Result<()> {
        let e = |m: &str| Err(BlockError::generic(m));
        let conflict =
            |t: &BucketLimit, r: &BucketLimit, w: &BucketLimit, f: fn(&BucketLimit) -> u64| {
                f(t) != 0 && (f(r) != 0 || f(w) != 0)
            };
        if conflict(&self.bps_total, &self.bps_read, &self.bps_write, |b| b.avg)
            || conflict(&self.iops_total, &self.iops_read, &self.iops_write, |b| {
                b.avg
            })
            || conflict(&self.bps_total, &self.bps_read, &self.bps_write, |b| b.max)
            || conflict(&self.iops_total, &self.iops_read, &self.iops_write, |b| {
                b.max
            })
        {
            return e(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            );
        }
        if self.iops_size != 0
            && self.iops_total.avg == 0
            && self.iops_read.avg == 0
            && self.iops_write.avg == 0
        {
            return e("iops size requires an iops value to be set");
        }
        for b in self.buckets() {
            if b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX {
                return Err(BlockError::generic(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                )));
            }
            if b.burst_length == 0 {
                return e("the burst length cannot be 0");
            }
            if b.burst_length > 1 && b.max == 0 {
                return e("burst length set without burst rate");
            }
            if b.max != 0 && b.burst_length > THROTTLE_VALUE_MAX / b.max {
                return e("burst length too high for this burst rate");
            }
            if b.max != 0 && b.avg == 0 {
                return e("bps_max/iops_max require corresponding bps/iops values");
            }
            if b.max != 0 && b.max < b.avg {
                return e("bps_max/iops_max cannot be lower than bps/iops");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

#[derive(Debug)]
struct State {
    limits: ThrottleLimits,
    levels: [Level; 6],
    last: Instant,
}

const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const OPS_TOTAL: usize = 3;
const OPS_READ: usize = 4;
const OPS_WRITE: usize = 5;

impl State {
    fn limit(&self, i: usize) -> BucketLimit {
        *self.limits.buckets()[i]
    }

    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.last).as_nanos() as f64;
        self.last = now;
        for i in 0..6 {
            let b = self.limit(i);
            let l = &mut self.levels[i];
            l.level = (l.level - b.avg as f64 * delta / 1e9).max(0.0);
            if b.burst_length > 1 {
                l.burst_level = (l.burst_level - b.max as f64 * delta / 1e9).max(0.0);
            }
        }
    }

    fn wait_of(&self, i: usize) -> f64 {
        let b = self.limit(i);
        let l = self.levels[i];
        if b.avg == 0 {
            return 0.0;
        }
        let (bucket, burst_bucket) = if b.max == 0 {
            (b.avg as f64 / 10.0, 0.0)
        } else {
            ((b.max * b.burst_length) as f64, b.max as f64 / 10.0)
        };
        let extra = l.level - bucket;
        if extra > 0.0 {
            return extra * 1e9 / b.avg as f64;
        }
        if b.burst_length > 1 {
            let extra = l.burst_level - burst_bucket;
            if extra > 0.0 {
                return extra * 1e9 / b.max as f64;
            }
        }
        0.0
    }

    fn wait(&self, write: bool) -> Duration {
        let idx = if write {
            [BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE]
        } else {
            [BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ]
        };
        let ns = idx.iter().map(|&i| self.wait_of(i)).fold(0.0, f64::max);
        Duration::from_nanos(ns as u64)
    }

    fn account(&mut self, write: bool, bytes: u64) {
        let units = if self.limits.iops_size != 0 && bytes > self.limits.iops_size {
            bytes as f64 / self.limits.iops_size as f64
        } else {
            1.0
        };
        let (b, o) = if write {
            (BPS_WRITE, OPS_WRITE)
        } else {
            (BPS_READ, OPS_READ)
        };
        for (i, amount) in [
            (BPS_TOTAL, bytes as f64),
            (b, bytes as f64),
            (OPS_TOTAL, units),
            (o, units),
        ] {
            let burst = self.limit(i).burst_length > 1;
            let l = &mut self.levels[i];
            l.level += amount;
            if burst {
                l.burst_level += amount;
            }
        }
    }
}

/// A throttle group: buckets shared by its members (BlockBackends and `throttle` filter
/// nodes).
#[derive(Debug)]
pub struct ThrottleGroup {
    name: String,
    /// Whether any limit is set: requests through a group without limits pass with one
    /// atomic load, no lock and no clock read.
    enabled: AtomicBool,
    state: Mutex<State>,
}

impl ThrottleGroup {
    fn new(name: &str, limits: ThrottleLimits) -> Arc<Self> {
        Arc::new(ThrottleGroup {
            name: name.to_string(),
            enabled: AtomicBool::new(limits.enabled()),
            state: Mutex::new(State {
                limits,
                levels: [Level::default(); 6],
                last: Instant::now(),
            }),
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current limits.
    pub fn limits(&self) -> ThrottleLimits {
        let mut l = mlock(&self.state).limits.clone();
        l.group = self.name.clone();
        l
    }

    /// Replaces the limits (the buckets keep their levels).
    pub fn set_limits(&self, limits: ThrottleLimits) {
        let mut s = mlock(&self.state);
        self.enabled.store(limits.enabled(), Ordering::Release);
        s.limits = limits;
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Waits until a request of `bytes` may go, then accounts it. `bypass` is polled while
    /// waiting: when it returns true (the backend is being drained), the request goes at
    /// once.
    pub fn intercept(&self, write: bool, bytes: u64, bypass: impl Fn() -> bool) {
        if !self.is_enabled() {
            return;
        }
        loop {
            let wait = {
                let mut s = mlock(&self.state);
                s.leak(Instant::now());
                let w = s.wait(write);
                if w.is_zero() || bypass() {
                    s.account(write, bytes);
                    return;
                }
                w
            };
            std::thread::sleep(wait.min(Duration::from_millis(10)));
        }
    }
}

/// The registry of named groups: those `block_set_io_throttle` creates (alive while a
/// member uses them) and those `object-add` creates (alive until `object-del`).
#[derive(Debug, Default)]
pub struct ThrottleGroups {
    groups: HashMap<String, Weak<ThrottleGroup>>,
    objects: HashMap<String, Arc<ThrottleGroup>>,
}

impl ThrottleGroups {
    /// The group `name`, created with `limits` if it does not exist; existing groups get
    /// the new limits.
    pub fn get_or_create(&mut self, name: &str, limits: ThrottleLimits) -> Arc<ThrottleGroup> {
        self.groups.retain(|_, w| w.strong_count() > 0);
        if let Some(g) = self.groups.get(name).and_then(Weak::upgrade) {
            g.set_limits(limits);
            return g;
        }
        let g = ThrottleGroup::new(name, limits);
        self.groups.insert(name.to_string(), Arc::downgrade(&g));
        g
    }

    /// The group `name`, if some member uses it or `object-add` created it.
    pub fn get(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.groups.get(name).and_then(Weak::upgrade)
    }

    /// `object-add` of a `throttle-group`: a group that lives until
    /// [`ThrottleGroups::remove_object`], with QEMU's errors for taken names.
    pub fn add_object(&mut self, id: &str, limits: ThrottleLimits) -> Result<Arc<ThrottleGroup>> {
        if self.objects.contains_key(id) {
            return Err(BlockError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        if self.get(id).is_some() {
            return Err(BlockError::generic("A group with this name already exists"));
        }
        limits.validate()?;
        self.groups.retain(|_, w| w.strong_count() > 0);
        let g = ThrottleGroup::new(id, limits);
        self.groups.insert(id.to_string(), Arc::downgrade(&g));
        self.objects.insert(id.to_string(), g.clone());
        Ok(g)
    }

    /// `object-del` of a group `object-add` created: refused while a member uses it.
    pub fn remove_object(&mut self, id: &str) -> Result<()> {
        let Some(g) = self.objects.get(id) else {
            return Err(BlockError::generic(format!("object '{id}' not found")));
        };
        if Arc::strong_count(g) > 1 {
            return Err(BlockError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.objects.remove(id);
        self.groups.remove(id);
        Ok(())
    }

    /// Whether `object-add` created the group `id`.
    pub fn is_object(&self, id: &str) -> bool {
        self.objects.contains_key(id)
    }
}

/// The members of QEMU's `ThrottleLimits` (QOM's `limits` property): (name, bucket index,
/// field: 0 avg, 1 max, 2 burst length).
const QOM_LIMITS: [(&str, usize, u8); 18] = [
    ("iops-total", OPS_TOTAL, 0),
    ("iops-total-max", OPS_TOTAL, 1),
    ("iops-total-max-length", OPS_TOTAL, 2),
    ("iops-read", OPS_READ, 0),
    ("iops-read-max", OPS_READ, 1),
    ("iops-read-max-length", OPS_READ, 2),
    ("iops-write", OPS_WRITE, 0),
    ("iops-write-max", OPS_WRITE, 1),
    ("iops-write-max-length", OPS_WRITE, 2),
    ("bps-total", BPS_TOTAL, 0),
    ("bps-total-max", BPS_TOTAL, 1),
    ("bps-total-max-length", BPS_TOTAL, 2),
    ("bps-read", BPS_READ, 0),
    ("bps-read-max", BPS_READ, 1),
    ("bps-read-max-length", BPS_READ, 2),
    ("bps-write", BPS_WRITE, 0),
    ("bps-write-max", BPS_WRITE, 1),
    ("bps-write-max-length", BPS_WRITE, 2),
];

impl ThrottleLimits {
    fn bucket_mut(&mut self, i: usize) -> &mut BucketLimit {
        match i {
            BPS_TOTAL => &mut self.bps_total,
            BPS_READ => &mut self.bps_read,
            BPS_WRITE => &mut self.bps_write,
            OPS_TOTAL => &mut self.iops_total,
            OPS_READ => &mut self.iops_read,
            _ => &mut self.iops_write,
        }
    }

    /// Sets one member of QEMU's `ThrottleLimits` by its QOM name (`bps-total-max`, ...,
    /// `iops-size`), with the range checks of QEMU's `throttle_limits_to_config`.
    fn set_qom(&mut self, name: &str, v: i64) -> Result<()> {
        if name == "iops-size" {
            if !(0..=u32::MAX as i64).contains(&v) {
                return Err(BlockError::generic(format!(
                    "iops size must be in the range [0, {}]",
                    u32::MAX
                )));
            }
            self.iops_size = v as u64;
            return Ok(());
        }
        let Some(&(_, i, field)) = QOM_LIMITS.iter().find(|(n, _, _)| *n == name) else {
            return Err(BlockError::generic(format!(
                "Parameter '{name}' is unexpected"
            )));
        };
        let b = self.bucket_mut(i);
        match field {
            // Negative values become huge ones, which validation refuses as QEMU does.
            0 => b.avg = v as u64,
            1 => b.max = v as u64,
            _ => {
                if !(0..=u32::MAX as i64).contains(&v) {
                    return Err(BlockError::generic(format!(
                        "{name} value must be in the range [0, {}]",
                        u32::MAX
                    )));
                }
                b.burst_length = v as u64;
            }
        }
        Ok(())
    }

    /// The limits of a `throttle-group` object from its QOM properties: QEMU's `limits`
    /// object and the legacy `x-iops-total`-style members (negative values refused), then
    /// validated with QEMU's messages.
    pub fn from_qom_props(props: Object) -> Result<ThrottleLimits> {
        let mut d = Decoder::strict();
        let mut m = props;
        let mut l = ThrottleLimits::default();
        let legacy: Vec<String> = m.keys().filter(|k| k.starts_with("x-")).cloned().collect();
        for k in legacy {
            let name = &k[2..];
            if name != "iops-size" && !QOM_LIMITS.iter().any(|(n, _, _)| *n == name) {
                continue;
            }
            let v: i64 = d.member(&mut m, &k).map_err(decode_err)?;
            if v < 0 {
                return Err(BlockError::generic("Property values cannot be negative"));
            }
            l.set_qom(name, v)?;
        }
        if let Some(QomLimits(given)) = d.optional(&mut m, "limits").map_err(decode_err)? {
            for (name, v) in given {
                l.set_qom(name, v)?;
            }
        }
        d.finish(m).map_err(decode_err)?;
        l.validate()?;
        Ok(l)
    }
}

fn decode_err(e: DecodeError) -> BlockError {
    BlockError::generic(e.0)
}

/// QEMU's `ThrottleLimits` as given: the members present, in QOM names.
struct QomLimits(Vec<(&'static str, i64)>);

impl QapiType for QomLimits {
    fn to_qmp(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect(),
        )
    }

    fn from_qmp(v: Value, d: &mut Decoder) -> std::result::Result<Self, DecodeError> {
        let mut m = d.object(v)?;
        let mut out = Vec::new();
        let names = QOM_LIMITS
            .iter()
            .map(|(n, _, _)| *n)
            .chain(std::iter::once("iops-size"));
        for n in names {
            if let Some(v) = d.optional::<i64>(&mut m, n)? {
                out.push((n, v));
            }
        }
        d.finish(m)?;
        Ok(QomLimits(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(f: impl FnOnce(&mut ThrottleLimits)) -> ThrottleLimits {
        let mut l = ThrottleLimits::default();
        f(&mut l);
        l
    }

    #[test]
    fn validation_messages() {
        let m = |l: ThrottleLimits| l.validate().unwrap_err().to_string();
        assert_eq!(
            m(lim(|l| {
                l.bps_total.avg = 1;
                l.bps_read.avg = 1
            })),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            m(lim(|l| l.iops_size = 4096)),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            m(lim(|l| l.bps_total.max = 10)),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            m(lim(|l| {
                l.bps_total.avg = 100;
                l.bps_total.max = 10
            })),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert_eq!(
            m(lim(|l| l.iops_read.burst_length = 3)),
            "burst length set without burst rate"
        );
        assert_eq!(
            m(lim(|l| l.iops_read.burst_length = 0)),
            "the burst length cannot be 0"
        );
        assert_eq!(
            m(lim(|l| l.bps_write.avg = u64::MAX)),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert!(lim(|l| l.bps_total.avg = 1).validate().is_ok());
        assert!(!ThrottleLimits::default().enabled());
    }

    #[test]
    fn bucket_math_follows_qemu() {
        let mut s = State {
            limits: lim(|l| l.bps_total.avg = 1000),
            levels: [Level::default(); 6],
            last: Instant::now(),
        };
        // The bucket holds avg/10 before throttling.
        s.account(false, 100);
        assert!(s.wait(false).is_zero());
        s.account(false, 100);
        // 100 units over the bucket at 1000/s: 100 ms.
        assert_eq!(s.wait(true).as_millis(), 100);
        let later = s.last + Duration::from_millis(100);
        s.leak(later);
        assert!(s.wait(false).is_zero());
    }

    #[test]
    fn iops_size_counts_units() {
        let mut s = State {
            limits: lim(|l| {
                l.iops_total.avg = 10;
                l.iops_size = 4096
            }),
            levels: [Level::default(); 6],
            last: Instant::now(),
        };
        s.account(true, 4 * 4096);
        assert_eq!(s.levels[OPS_TOTAL].level, 4.0);
        assert_eq!(s.levels[OPS_WRITE].level, 4.0);
        assert_eq!(s.levels[BPS_WRITE].level, 16384.0);
    }

    #[test]
    fn groups_are_shared_and_released() {
        let mut r = ThrottleGroups::default();
        let a = r.get_or_create("g", lim(|l| l.bps_total.avg = 1));
        let b = r.get_or_create("g", lim(|l| l.bps_total.avg = 2));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.limits().bps_total.avg, 2);
        assert_eq!(a.limits().group, "g");
        drop((a, b));
        assert!(r.get("g").is_none());
    }
}
