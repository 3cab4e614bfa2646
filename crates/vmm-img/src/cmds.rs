//! create, info, check and map (snapshot, resize and bitmap are in [`crate::edit`]).

use std::path::Path;

use serde_json::Value;

use qcow2::check::Fix;
use qcow2::{CompressionType, CreateOptions, ImageInfo, Preallocation, Qcow2};

use crate::graph_img::{has_dirty_flag, node_info, reduce, to_status, GraphImage, Plain, Source};
use crate::img::{create_raw, Cache, Image};
use crate::output;
use crate::Error;

fn on_off(k: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::msg(format!("Parameter '{k}' expects 'on' or 'off'"))),
    }
}

/// Parsed `-o` options of create/convert.
#[derive(Debug, Default)]
pub struct ImgOptions {
    /// Size given with `-o size=`.
    pub size: Option<u64>,
    /// qcow2 options.
    pub qcow2: CreateOptions,
    /// Raw preallocation.
    pub prealloc: Preallocation,
    /// Whether `preallocation` was given (qemu-img then shows it for raw images).
    pub prealloc_given: bool,
}

/// The `-o` options of raw images (raw's and the file protocol's creation options; the
/// others are qcow2's).
const RAW_OPTIONS: &[&str] = &["size", "preallocation"];

/// Parses `-o key=value,...` (possibly repeated).
pub fn parse_options(opts: &[String]) -> Result<ImgOptions, Error> {
    parse_options_for("qcow2", opts)
}

/// Parses `-o key=value,...` for images of format `fmt`, with QEMU's errors
/// (`qemu_opts_do_parse` over the format's creation options).
pub fn parse_options_for(fmt: &str, opts: &[String]) -> Result<ImgOptions, Error> {
    use crate::graph_opts::{option_number, option_size};
    let mut o = ImgOptions::default();
    for group in opts {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            if fmt == "raw" && !RAW_OPTIONS.contains(&k) {
                return Err(Error::msg(format!("Invalid parameter '{k}'")));
            }
            let q = &mut o.qcow2;
            match k {
                "size" => o.size = Some(option_size(k, v)?),
                "cluster_size" => q.cluster_size = option_size(k, v)?,
                "compat" => {
                    q.version = match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(Error::msg(format!(
                                "Parameter 'version' does not accept value '{v}'"
                            )))
                        }
                    }
                }
                "lazy_refcounts" => q.lazy_refcounts = on_off(k, v)?,
                "refcount_bits" => {
                    q.refcount_bits = option_number(k, v)?.try_into().map_err(|_| {
                        Error::msg(
                            "Refcount width must be a power of two and may not exceed 64 bits",
                        )
                    })?
                }
                "preallocation" => {
                    let p = Preallocation::from_name(v).ok_or_else(|| {
                        Error::msg(format!(
                            "Parameter 'preallocation' does not accept value '{v}'"
                        ))
                    })?;
                    q.preallocation = p;
                    o.prealloc = p;
                    o.prealloc_given = true;
                }
                "backing_file" => q.backing_file = Some(v.to_string()),
                "backing_fmt" => q.backing_format = Some(v.to_string()),
                "compression_type" => {
                    q.compression_type = CompressionType::from_name(v).ok_or_else(|| {
                        Error::msg(format!(
                            "Parameter 'compression-type' does not accept value '{v}'"
                        ))
                    })?
                }
                "extended_l2" => q.extended_l2 = on_off(k, v)?,
                "data_file" => q.data_file = Some(v.to_string()),
                "data_file_raw" => q.data_file_raw = on_off(k, v)?,
                "encryption" | "encrypt.format" => {
                    return Err(Error::msg("Encryption is not supported"))
                }
                _ => return Err(Error::msg(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    Ok(o)
}

/// Creates a qcow2 image at `path` with `q`, creating the external data file when named.
pub fn create_qcow2(path: &Path, q: &CreateOptions) -> Result<(), Error> {
    let data = match &q.data_file {
        Some(d) => {
            // QEMU uses data file names as given (relative to the working directory).
            let dp = std::path::PathBuf::from(d);
            if !dp.exists() {
                create_raw(&dp, q.size, Preallocation::Off)?;
            }
            let st: std::sync::Arc<dyn qcow2::Storage> =
                std::sync::Arc::new(qcow2::FileStorage::open(&dp, true, false)?);
            Some(st)
        }
        None => None,
    };
    let file = qcow2::FileStorage::create(path).map_err(|e| {
        Error::msg(format!(
            "Could not create '{}': {}",
            path.display(),
            crate::img::strerror(&e)
        ))
    })?;
    let file: std::sync::Arc<dyn qcow2::Storage> = std::sync::Arc::new(file);
    Qcow2::create_with_data(file, data, q)?;
    Ok(())
}

/// Arguments of `create` but the size.
pub struct CreateArgs<'a> {
    pub fmt: &'a str,
    pub options: &'a [String],
    pub backing: Option<String>,
    pub backing_fmt: Option<String>,
    pub unsafe_: bool,
    pub quiet: bool,
    pub filename: &'a str,
}

pub fn create(a: CreateArgs<'_>, size: Option<String>) -> Result<i32, Error> {
    // qemu-img reads the size argument itself; bdrv_img_create's errors name the file.
    let size = size
        .map(|s| crate::img::cvtnum("image size", &s))
        .transpose()?;
    let filename = a.filename;
    create_image(a, size).map_err(|e| Error::msg(format!("{filename}: {e}")))
}

/// `create` after its size argument (QEMU's `bdrv_img_create`).
fn create_image(a: CreateArgs<'_>, size: Option<u64>) -> Result<i32, Error> {
    let CreateArgs {
        fmt,
        options,
        backing,
        backing_fmt,
        unsafe_,
        quiet,
        filename,
    } = a;
    if fmt != "qcow2" && fmt != "raw" {
        return Err(Error::msg(format!("Unknown file format '{fmt}'")));
    }
    let mut o = parse_options_for(fmt, options)?;
    if size.is_some() && o.size.is_some() {
        return Err(Error::msg("The image size must be specified only once"));
    }
    if backing.is_some() {
        o.qcow2.backing_file = backing;
    }
    if fmt == "raw" && o.qcow2.backing_file.is_some() {
        return Err(Error::msg(
            "Backing file not supported for file format 'raw'",
        ));
    }
    if backing_fmt.is_some() {
        o.qcow2.backing_format = backing_fmt;
    }
    let path = Path::new(filename);
    let mut size = size.or(o.size);
    if let Some(b) = o.qcow2.backing_file.clone() {
        let bp = qcow2::backing::resolve_relative(&b, Some(path));
        match Image::open(
            &bp,
            o.qcow2.backing_format.as_deref(),
            false,
            Cache::Writeback,
        ) {
            Ok(img) => {
                if o.qcow2.backing_format.is_none() {
                    o.qcow2.backing_format = Some(img.format().to_string());
                }
                if size.is_none() {
                    size = Some(img.size());
                }
            }
            Err(e) if !unsafe_ => {
                // bdrv_open's error (without img_open's prefix) and QEMU's hint.
                let m = e.to_string();
                let m = m
                    .strip_prefix(&format!("Could not open '{}': ", bp.display()))
                    .unwrap_or(&m);
                return Err(Error::msg(format!("{m}\nCould not open backing image.")));
            }
            Err(_) => {}
        }
    }
    let size = size.ok_or_else(|| Error::msg("Image creation needs a size parameter"))?;
    o.qcow2.size = size;
    match fmt {
        "qcow2" => {
            if !quiet {
                let q = &o.qcow2;
                let mut line = format!(
                    "Formatting '{filename}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={size}",
                    q.cluster_size,
                    if q.extended_l2 { "on" } else { "off" },
                    q.compression_type.name()
                );
                if let Some(b) = &q.backing_file {
                    // qemu_opts_print doubles the commas of string values.
                    line.push_str(&format!(" backing_file={}", b.replace(',', ",,")));
                }
                if let Some(b) = &q.backing_format {
                    line.push_str(&format!(" backing_fmt={b}"));
                }
                if let Some(d) = &q.data_file {
                    line.push_str(&format!(" data_file={}", d.replace(',', ",,")));
                }
                if q.version == 2 {
                    line.push_str(" compat=0.10");
                }
                if q.preallocation != Preallocation::Off {
                    line.push_str(&format!(" preallocation={}", q.preallocation.name()));
                }
                line.push_str(&format!(
                    " lazy_refcounts={} refcount_bits={}",
                    if q.lazy_refcounts { "on" } else { "off" },
                    q.refcount_bits
                ));
                println!("{line}");
            }
            create_qcow2(path, &o.qcow2)?;
        }
        "raw" => {
            if !quiet {
                let mut line = format!("Formatting '{filename}', fmt=raw size={size}");
                if o.prealloc_given {
                    line.push_str(&format!(" preallocation={}", o.prealloc.name()));
                }
                println!("{line}");
            }
            create_raw(path, size, o.prealloc)?;
        }
        other => return Err(Error::msg(format!("Unknown file format '{other}'"))),
    }
    Ok(0)
}

fn raw_info(path: &Path, img: &Image) -> ImageInfo {
    let Image::Raw(r) = img else {
        unreachable!("raw_info on a raw image")
    };
    ImageInfo {
        filename: Some(path.to_string_lossy().into_owned()),
        format: "raw".into(),
        dirty_flag: false,
        actual_size: r.storage().allocated_size(),
        virtual_size: img.size(),
        cluster_size: 0,
        encrypted: false,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: qcow2::ImageInfoSpecificQCow2 {
            compat: String::new(),
            data_file: None,
            data_file_raw: None,
            extended_l2: None,
            lazy_refcounts: None,
            corrupt: None,
            refcount_bits: 0,
            bitmaps: None,
            compression_type: String::new(),
        },
    }
}

fn image_info(path: &Path, img: &Image) -> ImageInfo {
    match img {
        Image::Qcow2(q) => {
            let mut i = q.info();
            i.filename = Some(path.to_string_lossy().into_owned());
            i
        }
        Image::Raw(_) => raw_info(path, img),
        Image::Graph(g) => node_info(g.node(), Some(g.given())),
    }
}

/// The info of an image opened through the graph and, with `chain`, of its backing nodes.
/// `info`'s data per image: the info, whether it is qcow2, whether it has a dirty flag
/// (drivers without `bdrv_get_info` show none).
type Infos = Vec<(ImageInfo, bool, bool)>;

fn graph_infos(src: &Source<'_>, chain: bool) -> Result<Infos, Error> {
    // qemu-img opens every layer without its backing file and follows the backing file
    // names the layers' info gives (so "backing": null still shows the header's chain).
    let (top, next, next_fmt) = {
        let g = GraphImage::open(src, false, Cache::Writeback, true)?;
        g.refuse_backing_options(src.name)?;
        let n = g.node();
        let i = node_info(n, Some(g.given()));
        let (next, next_fmt) = (
            i.full_backing_filename.clone(),
            i.backing_filename_format.clone(),
        );
        if chain && next.is_none() {
            if let Some(b) = &i.backing_filename {
                return Err(Error::msg(format!(
                    "Could not determine absolute backing filename, but backing filename \
                     '{b}' present"
                )));
            }
        }
        (
            (i, n.driver_name() == "qcow2", has_dirty_flag(n)),
            next,
            next_fmt,
        )
    };
    let mut infos = vec![top];
    if let (true, Some(next)) = (chain, next) {
        infos.extend(file_infos(&Source::path(&next, next_fmt.as_deref()), true)?);
    }
    Ok(infos)
}

/// The info of a plain file and, with `chain`, of its backing files.
fn file_infos(src: &Source<'_>, chain: bool) -> Result<Infos, Error> {
    let mut infos = Vec::new();
    let mut path = std::path::PathBuf::from(src.name);
    let mut fmt = src.fmt.map(str::to_string);
    loop {
        let img = Image::open_opts(&path, fmt.as_deref(), false, Cache::Writeback, true)?;
        let i = image_info(&path, &img);
        let is_q = img.format() == "qcow2";
        let next = i.full_backing_filename.clone();
        let next_fmt = i.backing_filename_format.clone();
        infos.push((i, is_q, true));
        if !chain {
            break;
        }
        match next {
            Some(n) => {
                path = n.into();
                fmt = next_fmt;
            }
            None => break,
        }
        if infos.len() > 64 {
            return Err(Error::msg("backing chain too deep (loop?)"));
        }
    }
    Ok(infos)
}

pub fn info(src: &Source<'_>, output: &str, chain: bool) -> Result<i32, Error> {
    let infos = if src.uses_graph() {
        graph_infos(src, chain)?
    } else {
        file_infos(src, chain)?
    };
    let json = |(i, q, dirty): &(ImageInfo, bool, bool)| {
        let mut v = output::info_json(i, *q);
        if let (false, Value::Object(m)) = (dirty, &mut v) {
            m.remove("dirty-flag");
        }
        v
    };
    match output {
        "json" => {
            if chain {
                let v: Vec<Value> = infos.iter().map(json).collect();
                println!("{}", output::pretty(&Value::Array(v)));
            } else {
                println!("{}", output::pretty(&json(&infos[0])));
            }
        }
        "human" => {
            let texts: Vec<String> = infos
                .iter()
                .map(|(i, q, _)| output::info_human(i, *q))
                .collect();
            print!("{}", texts.join("\n"));
        }
        o => {
            return Err(Error::msg(format!(
                "--output must be used with human or json as argument ('{o}')"
            )))
        }
    }
    Ok(0)
}

pub fn check(
    src: &Source<'_>,
    output: &str,
    repair: Option<&str>,
    quiet: bool,
) -> Result<i32, Error> {
    let fix = match repair {
        None => Fix::NONE,
        Some("leaks") => Fix::LEAKS,
        Some("all") => Fix::ALL,
        Some(r) => return Err(Error::msg(format!("Invalid option for -r: '{r}'"))),
    };
    let writable = fix != Fix::NONE;
    // A qcow2 image over something else than a plain file: checked through the graph.
    let mut over_graph = false;
    let (filename, fmt) = if src.uses_graph() {
        match reduce(src)? {
            Plain::File { path, fmt } => (path, fmt.to_string()),
            Plain::Other(d) => {
                over_graph = d == "qcow2";
                (src.name.to_string(), d.to_string())
            }
        }
    } else {
        crate::img::check_openable(Path::new(src.name), writable)?;
        let fmt = match src.fmt {
            Some(f) => f.to_string(),
            None => qcow2::backing::probe_format(Path::new(src.name))?.to_string(),
        };
        (src.name.to_string(), fmt)
    };
    if fmt != "qcow2" {
        eprintln!("vmm-img: This image format does not support checks");
        return Ok(63);
    }
    // Declared first: the graph holding the file outlives the image over it.
    let mut _file_graph = None;
    let img = if over_graph {
        let (img, g) = crate::graph_img::qcow2_over_graph(src, writable)?;
        _file_graph = Some(g);
        img
    } else {
        // qemu-img check opens the backing chain too (a missing backing file fails it).
        Qcow2::open_path(
            Path::new(&filename),
            qcow2::OpenOptions {
                writable,
                allow_corrupt: writable,
                repair_dirty: false,
                opener: std::sync::Arc::new(crate::graph_img::GraphOpener::default()),
                ..Default::default()
            },
        )
        .map_err(|e| Error::msg(format!("Could not open '{filename}': {e}")))?
    };
    let r = img.check(fix)?;
    for m in &r.messages {
        if m.starts_with("ERROR") || m.starts_with("Leaked") {
            eprintln!("{m}");
        }
    }
    match output {
        "json" => println!(
            "{}",
            // The name as given (a json: or --image-opts string too).
            output::pretty(&output::check_json(&r, src.name, "qcow2"))
        ),
        _ if quiet => {}
        _ => {
            if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
                println!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                    r.leaks_fixed, r.corruptions_fixed
                );
            }
            print!("{}", output::check_human(&r));
        }
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

struct MapEntry {
    start: u64,
    len: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    offset: Option<u64>,
    /// The file the data is in, for images opened through the graph.
    file: Option<String>,
}

/// The file map's File column names for data at `depth` (`top`: the top image's).
fn layer_name(img: &Image, depth: u32, top: &str) -> String {
    if depth == 0 {
        return top.to_string();
    }
    let mut cur = Some(img.reader());
    for _ in 0..depth {
        cur = cur.and_then(|c| c.backing_image());
    }
    cur.and_then(|b| b.filename().map(|p| p.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

pub fn map(src: &Source<'_>, output: &str) -> Result<i32, Error> {
    let filename = src.name;
    let img = Image::open_source(src, false, Cache::Writeback)?;
    let size = img.size();
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(1 << 30);
        let (st, file) = match &img {
            Image::Graph(g) => {
                let s = g.status(off, len)?;
                // QEMU names a file only for data with an offset.
                let file = s.offset.map(|_| g.file_of(&s.node));
                (to_status(&s), file)
            }
            _ => (img.block_status(off, len)?, None),
        };
        if st.len == 0 {
            break;
        }
        let present = st.allocated;
        let e = MapEntry {
            start: off,
            len: st.len,
            depth: st.depth,
            present,
            zero: st.zero,
            data: st.data,
            offset: st.offset,
            file,
        };
        if let Some(last) = entries.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
            if last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && last.file == e.file
                && contiguous
            {
                last.len += e.len;
                off += st.len;
                continue;
            }
        }
        entries.push(e);
        off += st.len;
    }
    match output {
        "json" => {
            let lines: Vec<String> = entries
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                        e.start, e.len, e.depth, e.present, e.zero, e.data
                    );
                    if let Some(o) = e.offset {
                        s.push_str(&format!(", \"offset\": {o}"));
                    }
                    s.push('}');
                    s
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        _ => {
            // The top image's data lives in its external data file when it has one, named
            // as in the header (QEMU opens it by that name).
            let top = match &img {
                Image::Qcow2(q) => q.info().format_specific.data_file,
                _ => None,
            };
            let top = top.as_deref().unwrap_or(filename);
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            let hex = |v: u64| {
                if v == 0 {
                    "0".to_string()
                } else {
                    format!("{v:#x}")
                }
            };
            for e in &entries {
                if e.data && e.offset.is_none() {
                    return Err(Error::msg(
                        "File contains external, encrypted or compressed clusters.",
                    ));
                }
                if let (true, Some(o)) = (e.data, e.offset) {
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.len),
                        hex(o),
                        e.file
                            .clone()
                            .unwrap_or_else(|| layer_name(&img, e.depth, top))
                    );
                }
            }
        }
    }
    Ok(0)
}
