//! qemu-img's output formats: JSON with 4-space indentation and the human texts.

use serde_json::{json, Map, Value};

use qcow2::check::CheckResult;
use qcow2::{ImageInfo, SnapshotInfo};

use crate::img::size_to_str;

/// Pretty JSON as QEMU prints it.
pub fn pretty(v: &Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).expect("in-memory JSON");
    String::from_utf8(out).expect("JSON is UTF-8")
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(i) = s.icount {
        m.insert("icount".into(), json!(i));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec));
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_sec));
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

/// The format-specific part as (json key, human key, value) in QEMU's order.
fn qcow2_specific(info: &ImageInfo) -> Vec<(&'static str, &'static str, Value)> {
    let f = &info.format_specific;
    let mut v: Vec<(&'static str, &'static str, Value)> =
        vec![("compat", "compat", json!(f.compat))];
    v.push((
        "compression-type",
        "compression type",
        json!(f.compression_type),
    ));
    if let Some(l) = f.lazy_refcounts {
        v.push(("lazy-refcounts", "lazy refcounts", json!(l)));
    }
    if let Some(b) = &f.bitmaps {
        let list: Vec<Value> = b
            .iter()
            .map(|b| json!({"flags": b.flags, "name": b.name, "granularity": b.granularity}))
            .collect();
        v.push(("bitmaps", "bitmaps", Value::Array(list)));
    }
    v.push(("refcount-bits", "refcount bits", json!(f.refcount_bits)));
    if let Some(d) = &f.data_file {
        v.push(("data-file", "data file", json!(d)));
    }
    if let Some(r) = f.data_file_raw {
        v.push(("data-file-raw", "data file raw", json!(r)));
    }
    if let Some(c) = f.corrupt {
        v.push(("corrupt", "corrupt", json!(c)));
    }
    if let Some(e) = f.extended_l2 {
        v.push(("extended-l2", "extended l2", json!(e)));
    }
    v
}

/// ImageInfo as QEMU's JSON (qcow2 and raw).
pub fn info_json(info: &ImageInfo, is_qcow2: bool) -> Value {
    let mut m = Map::new();
    if let Some(f) = &info.backing_filename_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    if !info.snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            Value::Array(info.snapshots.iter().map(snapshot_json).collect()),
        );
    }
    m.insert("virtual-size".into(), json!(info.virtual_size));
    if let Some(f) = &info.filename {
        m.insert("filename".into(), json!(f));
    }
    if is_qcow2 {
        m.insert("cluster-size".into(), json!(info.cluster_size));
    }
    m.insert("format".into(), json!(info.format));
    if let Some(a) = info.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if is_qcow2 {
        let mut d = Map::new();
        for (k, _, v) in qcow2_specific(info) {
            d.insert(k.into(), v);
        }
        m.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(d)}),
        );
    }
    if let Some(f) = &info.full_backing_filename {
        m.insert("full-backing-filename".into(), json!(f));
    }
    if let Some(f) = &info.backing_filename {
        m.insert("backing-filename".into(), json!(f));
    }
    m.insert("dirty-flag".into(), json!(info.dirty_flag));
    Value::Object(m)
}

fn local_time(sec: u64) -> String {
    let t = sec as libc::time_t;
    // SAFETY: a zeroed tm is a valid out-parameter; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return String::new();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The snapshot table as `qemu-img snapshot -l` and `info` print it.
pub fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s.push_str(&format!(
            "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            local_time(sn.date_sec),
            clock,
            icount
        ));
    }
    s
}

fn human_value(out: &mut String, indent: usize, key: &str, v: &Value) {
    let pad = " ".repeat(indent);
    match v {
        Value::Array(a) => {
            out.push_str(&format!("{pad}{key}:\n"));
            for (i, e) in a.iter().enumerate() {
                human_value(out, indent + 4, &format!("[{i}]"), e);
            }
        }
        Value::Object(m) => {
            out.push_str(&format!("{pad}{key}:\n"));
            for (k, e) in m {
                human_value(out, indent + 4, k, e);
            }
        }
        Value::String(s) => out.push_str(&format!("{pad}{key}: {s}\n")),
        other => out.push_str(&format!("{pad}{key}: {other}\n")),
    }
}

/// ImageInfo as `qemu-img info` prints it.
pub fn info_human(info: &ImageInfo, is_qcow2: bool) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n",
        info.filename.clone().unwrap_or_default(),
        info.format,
        size_to_str(info.virtual_size),
        info.virtual_size
    ));
    s.push_str(&format!(
        "disk size: {}\n",
        info.actual_size
            .map(size_to_str)
            .unwrap_or_else(|| "unavailable".into())
    ));
    if is_qcow2 {
        s.push_str(&format!("cluster_size: {}\n", info.cluster_size));
    }
    if let Some(b) = &info.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        if let Some(full) = &info.full_backing_filename {
            if full != b {
                s.push_str(&format!(" (actual path: {full})"));
            }
        }
        s.push('\n');
    }
    if let Some(f) = &info.backing_filename_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if info.dirty_flag {
        s.push_str("cleanly shut down: no\n");
    }
    if !info.snapshots.is_empty() {
        s.push_str("Snapshot list:\n");
        s.push_str(&snapshot_table(&info.snapshots));
    }
    if is_qcow2 {
        s.push_str("Format specific information:\n");
        for (_, k, v) in qcow2_specific(info) {
            let human = match &v {
                Value::Array(a) => {
                    let objs: Vec<Value> = a
                        .iter()
                        .map(|b| {
                            let mut m = Map::new();
                            m.insert("flags".into(), b["flags"].clone());
                            m.insert("name".into(), b["name"].clone());
                            m.insert("granularity".into(), b["granularity"].clone());
                            Value::Object(m)
                        })
                        .collect();
                    Value::Array(objs)
                }
                other => other.clone(),
            };
            human_value(&mut s, 4, k, &human);
        }
    }
    s
}

/// `qemu-img check --output=json`.
pub fn check_json(r: &CheckResult, filename: &str, format: &str) -> Value {
    let mut m = Map::new();
    if r.image_end_offset > 0 {
        m.insert("image-end-offset".into(), json!(r.image_end_offset));
    }
    m.insert("total-clusters".into(), json!(r.total_clusters));
    m.insert("check-errors".into(), json!(r.check_errors));
    for (k, v) in [
        ("leaks", r.leaks),
        ("corruptions", r.corruptions),
        ("leaks-fixed", r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    }
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format));
    Value::Object(m)
}

/// `qemu-img check`'s human report.
pub fn check_human(r: &CheckResult) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let t = r.total_clusters as f64;
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / t,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset > 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}
