//! vmm-img: a disk image tool with qemu-img's syntax and output, built on the qcow2 crate.

mod aio;
mod bench;
mod chain;
mod cmds;
mod convert;
mod edit;
mod graph_img;
mod graph_info;
mod graph_opts;
mod img;
mod output;
mod progress;

use clap::{Parser, Subcommand};

use crate::graph_img::{resolve, Source};

/// Errors of the tool: printed as `vmm-img: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message for the user.
    #[error("{0}")]
    Msg(String),
    /// From the image library.
    #[error("{0}")]
    Qcow2(#[from] qcow2::Error),
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A failed read of an image opened through the block graph (qemu-img convert's words).
    #[error("error while reading at byte {offset}: {source}")]
    Read {
        /// Guest offset of the failed request.
        offset: u64,
        /// What the block layer reported.
        source: block_graph::BlockError,
    },
}

impl Error {
    /// A plain message.
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "vmm-img",
    version,
    about = "Disk image tool (qemu-img compatible syntax)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an image.
    Create {
        #[arg(short = 'f', default_value = "raw")]
        fmt: String,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'b')]
        backing: Option<String>,
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        #[arg(short = 'u')]
        unsafe_: bool,
        #[arg(short = 'q')]
        quiet: bool,
        filename: String,
        size: Option<String>,
    },
    /// Show information about an image.
    Info {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long, default_value = "human")]
        output: String,
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Check an image for consistency.
    Check {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long, default_value = "human")]
        output: String,
        #[arg(short = 'r')]
        repair: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Show the mapping of guest data to the image file(s).
    Map {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long, default_value = "human")]
        output: String,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Convert an image to another format.
    Convert {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'O', default_value = "raw")]
        out_fmt: String,
        #[arg(short = 'c')]
        compress: bool,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'n')]
        no_create: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(short = 'T')]
        src_cache: Option<String>,
        #[arg(short = 'W')]
        out_of_order: bool,
        #[arg(short = 'm')]
        coroutines: Option<String>,
        #[arg(short = 'B')]
        backing: Option<String>,
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        src: String,
        dst: String,
    },
    /// Compare two images.
    Compare {
        #[arg(short = 'f')]
        fmt1: Option<String>,
        #[arg(short = 'F')]
        fmt2: Option<String>,
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'T')]
        cache: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        a: String,
        b: String,
    },
    /// List, create, apply or delete internal snapshots.
    Snapshot {
        #[arg(short = 'l')]
        list: bool,
        #[arg(short = 'c')]
        create: Option<String>,
        #[arg(short = 'a')]
        apply: Option<String>,
        #[arg(short = 'd')]
        delete: Option<String>,
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Change the virtual size of an image.
    #[command(allow_negative_numbers = true)]
    Resize {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long)]
        shrink: bool,
        #[arg(long)]
        preallocation: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Operate on persistent bitmaps.
    Bitmap {
        #[arg(long)]
        add: bool,
        #[arg(long)]
        remove: bool,
        #[arg(long)]
        clear: bool,
        #[arg(long)]
        enable: bool,
        #[arg(long)]
        disable: bool,
        #[arg(long)]
        merge: Option<String>,
        #[arg(short = 'g')]
        granularity: Option<String>,
        #[arg(short = 'b')]
        source_file: Option<String>,
        #[arg(short = 'F')]
        source_fmt: Option<String>,
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
        bitmap: String,
    },
    /// Change the backing file of an image.
    Rebase {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'b')]
        backing: String,
        #[arg(short = 'F')]
        backing_fmt: Option<String>,
        #[arg(short = 'u')]
        unsafe_: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(short = 'T')]
        src_cache: Option<String>,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Commit the changes of an image into its backing file.
    Commit {
        #[arg(short = 'f')]
        fmt: Option<String>,
        #[arg(short = 'b')]
        base: Option<String>,
        #[arg(short = 'd')]
        keep: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 't')]
        cache: Option<String>,
        #[arg(long = "image-opts")]
        image_opts: bool,
        filename: String,
    },
    /// Benchmark reads or writes (qemu-img bench's flags).
    Bench(bench::BenchArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm-img: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cmd: Cmd) -> Result<i32, Error> {
    match cmd {
        Cmd::Create {
            fmt,
            options,
            backing,
            backing_fmt,
            unsafe_,
            quiet,
            filename,
            size,
        } => cmds::create(
            cmds::CreateArgs {
                fmt: &fmt,
                options: &options,
                backing,
                backing_fmt,
                unsafe_,
                quiet,
                filename: &filename,
            },
            size,
        ),
        Cmd::Info {
            fmt,
            output,
            backing_chain,
            force_share,
            image_opts,
            filename,
        } => cmds::info(
            &Source::new(&filename, fmt.as_deref(), image_opts, force_share),
            &output,
            backing_chain,
        ),
        Cmd::Check {
            fmt,
            output,
            repair,
            quiet,
            force_share,
            image_opts,
            filename,
        } => cmds::check(
            &Source::new(&filename, fmt.as_deref(), image_opts, force_share),
            &output,
            repair.as_deref(),
            quiet,
        ),
        Cmd::Map {
            fmt,
            output,
            force_share,
            image_opts,
            filename,
        } => cmds::map(
            &Source::new(&filename, fmt.as_deref(), image_opts, force_share),
            &output,
        ),
        Cmd::Convert {
            fmt,
            out_fmt,
            compress,
            options,
            progress,
            quiet,
            no_create,
            cache,
            src_cache,
            out_of_order,
            coroutines,
            backing,
            backing_fmt,
            force_share,
            image_opts,
            src,
            dst,
        } => convert::convert(&convert::ConvertArgs {
            image_opts,
            force_share,
            fmt,
            out_fmt,
            compress,
            options,
            no_create,
            cache,
            src_cache,
            backing,
            backing_fmt,
            src,
            dst,
            progress: progress && !quiet,
            workers: match coroutines {
                Some(m) => convert::parse_workers(&m)?,
                None => convert::DEFAULT_WORKERS,
            },
            in_order: !out_of_order,
        }),
        Cmd::Compare {
            fmt1,
            fmt2,
            strict,
            quiet,
            progress,
            cache,
            force_share,
            image_opts,
            a,
            b,
        } => chain::compare(&chain::CompareArgs {
            image_opts,
            force_share,
            fmt1: fmt1.as_deref(),
            fmt2: fmt2.as_deref(),
            cache: cache.as_deref(),
            strict,
            quiet,
            progress,
            a: &a,
            b: &b,
        }),
        Cmd::Snapshot {
            list,
            create,
            apply,
            delete,
            fmt,
            quiet: _,
            force_share,
            image_opts,
            filename,
        } => {
            let (filename, fmt) = resolve(&Source::new(
                &filename,
                fmt.as_deref(),
                image_opts,
                force_share,
            ))?;
            let src = Source::new(&filename, fmt.as_deref(), false, force_share);
            edit::snapshot(list, create, apply, delete, &src)
        }
        Cmd::Resize {
            fmt,
            shrink,
            preallocation,
            quiet,
            image_opts,
            filename,
            size,
        } => {
            let (filename, fmt) =
                resolve(&Source::new(&filename, fmt.as_deref(), image_opts, false))?;
            edit::resize(
                fmt.as_deref(),
                shrink,
                preallocation.as_deref(),
                quiet,
                &filename,
                &size,
            )
        }
        Cmd::Bitmap {
            add,
            remove,
            clear,
            enable,
            disable,
            merge,
            granularity,
            source_file,
            source_fmt,
            fmt,
            image_opts,
            filename,
            bitmap,
        } => edit::bitmap(&edit::BitmapArgs {
            add,
            remove,
            clear,
            enable,
            disable,
            merge,
            granularity,
            source_file,
            source_fmt,
            fmt,
            image_opts,
            filename,
            bitmap,
        }),
        Cmd::Rebase {
            fmt,
            backing,
            backing_fmt,
            unsafe_,
            quiet,
            progress,
            cache,
            src_cache,
            image_opts,
            filename,
        } => {
            let (filename, fmt) =
                resolve(&Source::new(&filename, fmt.as_deref(), image_opts, false))?;
            chain::rebase(&chain::RebaseArgs {
                fmt: fmt.as_deref(),
                backing: &backing,
                backing_fmt: backing_fmt.as_deref(),
                unsafe_,
                cache: cache.as_deref(),
                src_cache: src_cache.as_deref(),
                quiet,
                progress,
                filename: &filename,
            })
        }
        Cmd::Commit {
            fmt,
            base,
            keep,
            quiet,
            progress,
            cache,
            image_opts,
            filename,
        } => {
            let (filename, fmt) =
                resolve(&Source::new(&filename, fmt.as_deref(), image_opts, false))?;
            chain::commit(&chain::CommitArgs {
                fmt: fmt.as_deref(),
                base: base.as_deref(),
                keep,
                quiet,
                progress,
                cache: cache.as_deref(),
                filename: &filename,
            })
        }
        Cmd::Bench(a) => bench::bench(&a),
    }
}
