//! The generic options of `BlockdevOptions` (read-only, cache, discard, detect-zeroes, ...)
//! and how children inherit them from their parents, as QEMU's `bdrv_inherited_options` and
//! `bdrv_backing_options` do.

use qapi_types::{
    BlockdevAioOptions, BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions,
};

use crate::error::{BlockError, Result};
use crate::perm::ChildRole;

/// `aio`: how a `file` node submits its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// `threads` (the default): each request on the thread that makes it; batches through
    /// `io_uring` with `cache.direct=on`, request by request through the page cache.
    #[default]
    Threads,
    /// `native` (needs `cache.direct=on`): as `threads`.
    Native,
    /// `io_uring`: batches through `io_uring` whatever the cache mode; the node fails to
    /// open where `io_uring` cannot be set up, as QEMU's does.
    IoUring,
}

/// `detect-zeroes`: what to do with writes of all-zero buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Write them as they are.
    #[default]
    Off,
    /// Turn them into write-zeroes requests.
    On,
    /// Turn them into write-zeroes requests that may unmap (with `discard=unmap`).
    Unmap,
}

/// The generic options of a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Opened read-only.
    pub read_only: bool,
    /// `auto-read-only`.
    pub auto_read_only: bool,
    /// `cache.direct`: bypass the host page cache.
    pub cache_direct: bool,
    /// `cache.no-flush`: ignore flushes.
    pub cache_no_flush: bool,
    /// `cache.writeback` (always true since QEMU 2.x; reported in `cache`).
    pub cache_writeback: bool,
    /// `discard=unmap`: pass discards down (otherwise they are ignored).
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `force-share`: share every permission with other users.
    pub force_share: bool,
    /// `aio`, inherited by children as QEMU's open flags are.
    pub aio: Aio,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            read_only: false,
            auto_read_only: false,
            cache_direct: false,
            cache_no_flush: false,
            cache_writeback: true,
            discard_unmap: false,
            detect_zeroes: DetectZeroes::Off,
            force_share: false,
            aio: Aio::Threads,
        }
    }
}

/// Defaults a node takes from its parent when its own options leave them unset.
#[derive(Debug, Clone, Default)]
pub struct Inherit {
    /// The node is the top of a `blockdev-add` (where `id`, `werror`, ... are allowed).
    pub top_level: bool,
    /// Default for `read-only`.
    pub read_only: Option<bool>,
    /// Default for `auto-read-only`.
    pub auto_read_only: Option<bool>,
    /// Default for `cache.direct`.
    pub cache_direct: Option<bool>,
    /// Default for `cache.no-flush`.
    pub cache_no_flush: Option<bool>,
    /// Default for `discard` (`Some(true)`: unmap).
    pub discard_unmap: Option<bool>,
    /// Default for `aio`.
    pub aio: Option<Aio>,
}

impl Inherit {
    /// The defaults of a `blockdev-add` top level.
    pub fn top() -> Self {
        Inherit {
            top_level: true,
            ..Default::default()
        }
    }

    /// What a child in `role` inherits from a parent opened with `parent`.
    pub fn for_child(parent: &NodeOptions, role: ChildRole) -> Self {
        let (read_only, auto_read_only, discard_unmap) = match role {
            // Backing files are opened read-only by default.
            ChildRole::Cow => (true, false, None),
            // Drivers send flushes and respect the unmap policy themselves, so lower layers
            // default to passing discards on.
            _ => (parent.read_only, parent.auto_read_only, Some(true)),
        };
        Inherit {
            top_level: false,
            read_only: Some(read_only),
            auto_read_only: Some(auto_read_only),
            cache_direct: Some(parent.cache_direct),
            cache_no_flush: Some(parent.cache_no_flush),
            discard_unmap,
            aio: Some(parent.aio),
        }
    }
}

/// The generic options of a node, checked as QEMU checks them.
pub fn node_options(o: &BlockdevOptions, inh: &Inherit) -> Result<NodeOptions> {
    let read_only = o.read_only.or(inh.read_only).unwrap_or(false);
    let auto_read_only = o.auto_read_only.or(inh.auto_read_only).unwrap_or(false);
    let cache = o.cache.clone().unwrap_or_default();
    let cache_direct = cache.direct.or(inh.cache_direct).unwrap_or(false);
    let cache_no_flush = cache.no_flush.or(inh.cache_no_flush).unwrap_or(false);
    let cache_writeback = cache.writeback.unwrap_or(true);
    let discard_unmap = match &o.discard {
        Some(BlockdevDiscardOptions::Unmap) => true,
        Some(BlockdevDiscardOptions::Ignore) => false,
        Some(BlockdevDiscardOptions::Unrecognized(s)) => {
            return Err(BlockError::generic(format!("Invalid discard option '{s}'")))
        }
        None => inh.discard_unmap.unwrap_or(false),
    };
    let detect_zeroes = match &o.detect_zeroes {
        None | Some(BlockdevDetectZeroesOptions::Off) => DetectZeroes::Off,
        Some(BlockdevDetectZeroesOptions::On) => DetectZeroes::On,
        Some(BlockdevDetectZeroesOptions::Unmap) => {
            if !discard_unmap {
                return Err(BlockError::generic(
                    "setting detect-zeroes to unmap is not allowed without setting discard \
                     operation to unmap",
                ));
            }
            DetectZeroes::Unmap
        }
        Some(BlockdevDetectZeroesOptions::Unrecognized(s)) => {
            return Err(BlockError::generic(format!(
                "Parameter 'detect-zeroes' does not accept value '{s}'"
            )))
        }
    };
    let force_share = o.force_share.unwrap_or(false);
    if force_share && !read_only {
        return Err(BlockError::generic(
            "force-share=on can only be used with read-only images",
        ));
    }
    let aio = match &o.aio {
        None => inh.aio.unwrap_or_default(),
        Some(BlockdevAioOptions::Threads) => Aio::Threads,
        Some(BlockdevAioOptions::Native) => {
            if !cache_direct {
                return Err(BlockError::generic(
                    "aio=native was specified, but it requires cache.direct=on, which was not \
                     specified.",
                ));
            }
            Aio::Native
        }
        Some(BlockdevAioOptions::IoUring) => Aio::IoUring,
        Some(other) => {
            return Err(BlockError::generic(format!(
                "Parameter 'aio' does not accept value '{}'",
                other.as_str()
            )))
        }
    };
    let backend_only = o.werror.is_some()
        || o.rerror.is_some()
        || o.stats_account_invalid.is_some()
        || o.stats_account_failed.is_some()
        || o.stats_intervals.is_some();
    if backend_only && (!inh.top_level || o.id.is_none()) {
        return Err(BlockError::generic(
            "werror, rerror and the stats-* options need a BlockBackend: they are only \
             allowed with 'id' at the top level",
        ));
    }
    Ok(NodeOptions {
        read_only,
        auto_read_only,
        cache_direct,
        cache_no_flush,
        cache_writeback,
        discard_unmap,
        detect_zeroes,
        force_share,
        aio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qapi_types::QapiType;
    use serde_json::json;

    fn opts(v: serde_json::Value) -> BlockdevOptions {
        BlockdevOptions::from_qmp_strict(v).unwrap()
    }

    #[test]
    fn children_inherit_aio() {
        let p = node_options(
            &opts(json!({"driver": "null-co", "aio": "io_uring"})),
            &Inherit::top(),
        )
        .unwrap();
        assert_eq!(p.aio, Aio::IoUring);
        let file = Inherit::for_child(&p, ChildRole::Image);
        let c = node_options(&opts(json!({"driver": "null-co"})), &file).unwrap();
        assert_eq!(c.aio, Aio::IoUring);
        let b = node_options(
            &opts(json!({"driver": "null-co"})),
            &Inherit::for_child(&p, ChildRole::Cow),
        )
        .unwrap();
        assert_eq!(b.aio, Aio::IoUring);
        let own = node_options(&opts(json!({"driver": "null-co", "aio": "threads"})), &file);
        assert_eq!(own.unwrap().aio, Aio::Threads);
        assert_eq!(
            node_options(&opts(json!({"driver": "null-co", "aio": "native"})), &file)
                .unwrap_err()
                .to_string(),
            "aio=native was specified, but it requires cache.direct=on, which was not \
             specified."
        );
        assert_eq!(
            node_options(&opts(json!({"driver": "null-co"})), &Inherit::top())
                .unwrap()
                .aio,
            Aio::Threads
        );
    }

    #[test]
    fn children_inherit_cache_and_read_only() {
        let p = node_options(
            &opts(json!({"driver": "null-co", "read-only": true, "cache": {"direct": true}})),
            &Inherit::top(),
        )
        .unwrap();
        assert!(p.read_only && p.cache_direct && !p.discard_unmap);
        let c = node_options(
            &opts(json!({"driver": "null-co"})),
            &Inherit::for_child(&p, ChildRole::Image),
        )
        .unwrap();
        assert!(c.read_only && c.cache_direct && c.discard_unmap);
        let b = node_options(
            &opts(json!({"driver": "null-co", "read-only": false})),
            &Inherit::for_child(&p, ChildRole::Cow),
        )
        .unwrap();
        assert!(!b.read_only);
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let e = node_options(
            &opts(json!({"driver": "null-co", "detect-zeroes": "unmap"})),
            &Inherit::top(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("setting detect-zeroes to unmap"));
        let e = node_options(
            &opts(json!({"driver": "null-co", "force-share": true})),
            &Inherit::top(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "force-share=on can only be used with read-only images"
        );
        assert!(node_options(
            &opts(json!({"driver": "null-co", "aio": "native"})),
            &Inherit::top()
        )
        .is_err());
        assert!(node_options(
            &opts(json!({"driver": "null-co", "werror": "stop"})),
            &Inherit::top()
        )
        .is_err());
        assert!(node_options(
            &opts(json!({"driver": "null-co", "id": "d", "werror": "stop"})),
            &Inherit::top()
        )
        .is_ok());
    }
}
