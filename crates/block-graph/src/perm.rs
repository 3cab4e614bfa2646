//! Permissions: what each user of a node needs from it and what it lets other users do
//! (QEMU's `BLK_PERM_*` and `bdrv_child_perm`).
//!
//! Every edge of the graph (a parent using a child node, or a BlockBackend using its root)
//! carries a pair: `perm`, the operations the parent performs, and `shared`, the operations
//! it tolerates from the node's other parents. Two parents of one node conflict when one needs
//! something the other does not share; such a graph change is refused with QEMU's message.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Not};

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u32);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return what was last written (nobody changes the data behind the reader's back
    /// in a way it cannot see, e.g. a format driver whose metadata must stay consistent).
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Writes that change the visible data.
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that leave the visible data unchanged (copy-on-read, a mirror's copies).
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the length.
    pub const RESIZE: Perm = Perm(0x08);
    /// Changing the node's children (QEMU's former `BLK_PERM_GRAPH_MOD`).
    pub const GRAPH_MOD: Perm = Perm(0x10);
    /// Every permission.
    pub const ALL: Perm = Perm(0x1f);

    /// Permissions a filter passes from its parents to its child unchanged.
    pub const PASSTHROUGH: Perm =
        Perm(Self::CONSISTENT_READ.0 | Self::WRITE.0 | Self::WRITE_UNCHANGED.0 | Self::RESIZE.0);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The set from raw bits (unknown bits dropped).
    pub const fn from_bits(bits: u32) -> Perm {
        Perm(bits & Self::ALL.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's names, comma separated ("write, resize").
    pub fn names(self) -> String {
        const NAMES: [(Perm, &str); 5] = [
            (Perm::CONSISTENT_READ, "consistent read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write unchanged"),
            (Perm::RESIZE, "resize"),
            (Perm::GRAPH_MOD, "change children"),
        ];
        NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.names())
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl BitOrAssign for Perm {
    fn bitor_assign(&mut self, o: Perm) {
        self.0 |= o.0;
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Self::ALL.0)
    }
}

/// What a child is to its parent (QEMU's `BdrvChildRole`), which decides the default
/// permissions the parent takes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildRole {
    /// The child holds the image's metadata and data (a format's `file`).
    Image,
    /// The child holds only metadata (a format with an external data file: its `file`).
    Metadata,
    /// The child holds only guest data (`data-file`).
    Data,
    /// A backing image: read for unallocated ranges, never written.
    Cow,
    /// The child is the node's data seen through a filter (`raw` without offset/size,
    /// `blkdebug`, `throttle`, a BlockBackend's root).
    Filtered,
    /// One of several equal data children (quorum).
    Replica,
}

/// The permissions a parent with cumulative needs (`perm`, `shared`) takes on a child in
/// `role`, following QEMU's `bdrv_default_perms`. `writable` says whether the parent node is
/// opened read-write (format drivers then write metadata even without a writing user).
pub fn default_child_perm(
    role: ChildRole,
    perm: Perm,
    shared: Perm,
    writable: bool,
) -> (Perm, Perm) {
    // Filter defaults: forward what the parents need and share.
    let mut nperm = perm & Perm::PASSTHROUGH;
    let mut nshared = (shared & Perm::PASSTHROUGH) | (!Perm::PASSTHROUGH);
    match role {
        ChildRole::Filtered | ChildRole::Replica => {}
        ChildRole::Cow => {
            nperm = perm & Perm::CONSISTENT_READ;
            nshared = if shared.contains(Perm::WRITE) {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::NONE
            };
            nshared |= Perm::CONSISTENT_READ | Perm::GRAPH_MOD | Perm::WRITE_UNCHANGED;
        }
        ChildRole::Image | ChildRole::Metadata | ChildRole::Data => {
            if matches!(role, ChildRole::Image | ChildRole::Metadata) {
                if writable {
                    nperm |= Perm::WRITE | Perm::RESIZE;
                }
                nperm |= Perm::CONSISTENT_READ;
                nshared = nshared & !(Perm::WRITE | Perm::RESIZE);
            }
            if matches!(role, ChildRole::Image | ChildRole::Data) {
                nshared = nshared & !Perm::RESIZE;
                if nperm.contains(Perm::WRITE_UNCHANGED) {
                    nperm |= Perm::WRITE;
                }
                if nperm.contains(Perm::WRITE) {
                    nperm |= Perm::RESIZE;
                }
            }
        }
    }
    (nperm, nshared)
}

/// One user of a node, for conflict checks and their messages.
#[derive(Debug, Clone)]
pub struct PermUser {
    /// QEMU's description of the parent: `node 'q1'`, `block device 'disk0'`,
    /// `an unnamed block device`.
    pub desc: String,
    /// The child's name in the parent (`file`, `backing`, `root`).
    pub child_name: String,
    /// What the parent needs.
    pub perm: Perm,
    /// What the parent lets others do.
    pub shared: Perm,
}

/// Checks the users of node `node_name` pairwise (`users` newest first, as QEMU keeps its
/// parent list) and words the first conflict exactly as QEMU does.
pub fn check_conflicts(node_name: &str, users: &[PermUser]) -> Result<(), String> {
    for (i, a) in users.iter().enumerate() {
        for (j, b) in users.iter().enumerate() {
            if i == j {
                continue;
            }
            let missing = b.perm & !a.shared;
            if !missing.is_empty() {
                return Err(format!(
                    "Permission conflict on node '{node_name}': permissions '{}' are both \
                     required by {} (uses node '{node_name}' as '{}' child) and unshared by {} \
                     (uses node '{node_name}' as '{}' child).",
                    missing.names(),
                    b.desc,
                    b.child_name,
                    a.desc,
                    a.child_name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_qemu_order() {
        assert_eq!((Perm::RESIZE | Perm::WRITE).names(), "write, resize");
        assert_eq!(Perm::ALL.names().split(", ").count(), 5);
        assert_eq!(!Perm::ALL, Perm::NONE);
    }

    #[test]
    fn format_child_of_writable_node_takes_write_and_unshares_it() {
        let (p, s) = default_child_perm(ChildRole::Image, Perm::NONE, Perm::ALL, true);
        assert_eq!(p, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
        assert!(!s.contains(Perm::WRITE) && !s.contains(Perm::RESIZE));
        let (p, _) = default_child_perm(ChildRole::Image, Perm::NONE, Perm::ALL, false);
        assert_eq!(p, Perm::CONSISTENT_READ);
    }

    #[test]
    fn cow_child_is_only_read() {
        let (p, s) = default_child_perm(
            ChildRole::Cow,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
            true,
        );
        assert_eq!(p, Perm::CONSISTENT_READ);
        assert!(!s.contains(Perm::WRITE));
        assert!(s.contains(Perm::WRITE_UNCHANGED));
    }

    #[test]
    fn filter_forwards() {
        let (p, s) = default_child_perm(ChildRole::Filtered, Perm::WRITE, Perm::ALL, true);
        assert_eq!(p, Perm::WRITE);
        assert_eq!(s, Perm::ALL);
    }

    #[test]
    fn conflict_message_is_qemus() {
        let (p, s) = default_child_perm(ChildRole::Image, Perm::NONE, Perm::ALL, true);
        let users = [
            PermUser {
                desc: "node 'q2'".into(),
                child_name: "file".into(),
                perm: p,
                shared: s,
            },
            PermUser {
                desc: "node 'q1'".into(),
                child_name: "file".into(),
                perm: p,
                shared: s,
            },
        ];
        assert_eq!(
            check_conflicts("f1", &users).unwrap_err(),
            "Permission conflict on node 'f1': permissions 'write, resize' are both required by \
             node 'q1' (uses node 'f1' as 'file' child) and unshared by node 'q2' (uses node \
             'f1' as 'file' child)."
        );
        assert!(check_conflicts("f1", &users[..1]).is_ok());
    }
}
