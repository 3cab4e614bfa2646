//! File descriptors passed over the QMP socket (SCM_RIGHTS): named ones for
//! `getfd`/`closefd`, and fd sets for `add-fd`/`remove-fd`/`query-fdsets`,
//! which image paths such as `/dev/fdset/N` resolve to.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use chardev_ringbuf::FdResolver;

use qapi_types::{cmd, AddfdInfo, Dispatcher, FdsetFdInfo, FdsetInfo};
use qmp_proto::QmpError;

use crate::vm::Vmm;

/// One descriptor of an fd set.
#[derive(Debug)]
struct SetFd {
    fd: OwnedFd,
    opaque: Option<String>,
}

/// The descriptors clients passed in.
#[derive(Debug, Default)]
pub struct FdStore {
    /// Descriptors that arrived with the request being executed.
    pub incoming: Vec<OwnedFd>,
    /// Shared with the chardev registry, which resolves `fd=NAME` addresses.
    named: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    /// Sets by id; `order` keeps QEMU's listing order (newest set first).
    sets: BTreeMap<i64, Vec<SetFd>>,
    order: Vec<i64>,
}

const NO_FD: &str = "No file descriptor supplied via SCM_RIGHTS";

impl FdStore {
    fn take_incoming(&mut self) -> Result<OwnedFd, QmpError> {
        if self.incoming.is_empty() {
            return Err(QmpError::generic(NO_FD));
        }
        Ok(self.incoming.remove(0))
    }

    /// `getfd`: names the descriptor that came with the request (replacing,
    /// and closing, an older one of that name).
    pub fn getfd(&mut self, name: &str) -> Result<(), QmpError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        let fd = self.take_incoming()?;
        self.named
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        self.named
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Resolves `fd=NAME` in chardev socket addresses to a duplicate of the
    /// descriptor `getfd` named so, as QEMU's monitor_get_fd does.
    pub fn resolver(&self) -> FdResolver {
        let named = self.named.clone();
        Box::new(move |name: &str| {
            let named = named.lock().unwrap_or_else(|e| e.into_inner());
            let fd = named
                .get(name)
                .ok_or_else(|| format!("File descriptor named '{name}' has not been found"))?;
            fd.try_clone().map_err(|e| e.to_string())
        })
    }

    /// `add-fd`: into set `id`, or the lowest unused id.
    pub fn add_fd(
        &mut self,
        id: Option<i64>,
        opaque: Option<String>,
    ) -> Result<AddfdInfo, QmpError> {
        if id.is_some_and(|i| i < 0) {
            return Err(QmpError::generic(
                "Parameter 'fdset-id' expects a non-negative value",
            ));
        }
        let fd = self.take_incoming()?;
        let id = id.unwrap_or_else(|| (0..).find(|i| !self.sets.contains_key(i)).unwrap_or(0));
        let raw = i64::from(fd.as_raw_fd());
        if !self.sets.contains_key(&id) {
            self.order.insert(0, id);
        }
        self.sets.entry(id).or_default().push(SetFd { fd, opaque });
        Ok(AddfdInfo {
            fdset_id: id,
            fd: raw,
        })
    }

    /// `remove-fd`: one descriptor of a set, or the whole set.
    pub fn remove_fd(&mut self, id: i64, fd: Option<i64>) -> Result<(), QmpError> {
        let not_found = || {
            let what = match fd {
                Some(fd) => format!("fdset-id:{id}, fd:{fd}"),
                None => format!("fdset-id:{id}"),
            };
            QmpError::generic(format!("File descriptor named '{what}' not found"))
        };
        let set = self.sets.get_mut(&id).ok_or_else(not_found)?;
        match fd {
            Some(fd) => {
                let pos = set
                    .iter()
                    .position(|s| i64::from(s.fd.as_raw_fd()) == fd)
                    .ok_or_else(not_found)?;
                set.remove(pos);
            }
            None => set.clear(),
        }
        if set.is_empty() {
            self.sets.remove(&id);
            self.order.retain(|&i| i != id);
        }
        Ok(())
    }

    /// `query-fdsets`.
    pub fn query(&self) -> Vec<FdsetInfo> {
        self.order
            .iter()
            .filter_map(|id| {
                let set = self.sets.get(id)?;
                Some(FdsetInfo {
                    fdset_id: *id,
                    fds: set
                        .iter()
                        .map(|s| FdsetFdInfo {
                            fd: i64::from(s.fd.as_raw_fd()),
                            opaque: s.opaque.clone(),
                        })
                        .collect(),
                })
            })
            .collect()
    }
}

/// Registers the fd commands.
pub fn register(d: &mut Dispatcher<Vmm>) {
    d.register::<cmd::Getfd>(|vmm, a| vmm.fds.getfd(&a.fdname));
    d.register::<cmd::Closefd>(|vmm, a| vmm.fds.closefd(&a.fdname));
    d.register::<cmd::AddFd>(|vmm, a| vmm.fds.add_fd(a.fdset_id, a.opaque));
    d.register::<cmd::RemoveFd>(|vmm, a| vmm.fds.remove_fd(a.fdset_id, a.fd));
    d.register::<cmd::QueryFdsets>(|vmm, _| Ok(vmm.fds.query()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_fd() -> OwnedFd {
        let (r, _w) = std::io::pipe().unwrap();
        r.into()
    }

    #[test]
    fn fd_sets_follow_qemu() {
        let mut s = FdStore::default();
        assert_eq!(s.add_fd(None, None).unwrap_err().desc, NO_FD);
        s.incoming.push(pipe_fd());
        assert_eq!(s.add_fd(None, Some("rdonly".into())).unwrap().fdset_id, 0);
        s.incoming.push(pipe_fd());
        assert_eq!(s.add_fd(Some(1), None).unwrap().fdset_id, 1);
        s.incoming.push(pipe_fd());
        assert_eq!(s.add_fd(None, None).unwrap().fdset_id, 2);
        let ids: Vec<i64> = s.query().iter().map(|f| f.fdset_id).collect();
        assert_eq!(ids, [2, 1, 0], "newest set first, as QEMU lists them");
        assert_eq!(
            s.remove_fd(7, None).unwrap_err().desc,
            "File descriptor named 'fdset-id:7' not found"
        );
        assert_eq!(
            s.remove_fd(1, Some(99)).unwrap_err().desc,
            "File descriptor named 'fdset-id:1, fd:99' not found"
        );
        s.remove_fd(0, None).unwrap();
        let ids: Vec<i64> = s.query().iter().map(|f| f.fdset_id).collect();
        assert_eq!(ids, [2, 1]);
    }

    #[test]
    fn named_fds_follow_qemu() {
        let mut s = FdStore::default();
        assert_eq!(s.getfd("a").unwrap_err().desc, NO_FD);
        s.incoming.push(pipe_fd());
        assert!(s
            .getfd("1a")
            .unwrap_err()
            .desc
            .contains("not starting with a digit"));
        s.getfd("a").unwrap();
        assert!((s.resolver())("a").is_ok());
        assert!((s.resolver())("b")
            .unwrap_err()
            .contains("'b' has not been found"));
        s.closefd("a").unwrap();
        assert_eq!(
            s.closefd("a").unwrap_err().desc,
            "File descriptor named 'a' not found"
        );
    }
}
