//! Connection admission: how many WebSocket connections this node holds, in all and per client
//! address. A [`Slot`] is taken when an upgrade is accepted and given back when it is dropped:
//! when the connection ends, or when the upgrade never completes.
//!
//! Every connection holds a file descriptor. A node that accepted connections until the
//! open-files limit would fail everything else that needs one (database connections, the
//! SQLite files, new HTTP requests); so it refuses upgrades beyond `max_total` instead, and
//! one address cannot take more than `max_per_ip` of them when that limit is set.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The node holds `max_total` connections.
    NodeFull,
    /// The client's address holds `max_per_ip` connections.
    AddressFull,
}

/// The node's connection counts and limits.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Most connections in all; 0 for no limit.
    max_total: u64,
    /// Most connections per client address; 0 for no limit (then addresses are not counted).
    max_per_ip: u32,
    total: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    /// The counted address (None when addresses are not counted).
    ip: Option<IpAddr>,
}

impl Admission {
    pub(crate) fn new(max_total: u64, max_per_ip: u32) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            total: AtomicU64::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `ip`, or why there is none.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let taken = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total > 0 && taken >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::NodeFull);
        }
        if self.max_per_ip == 0 {
            return Ok(Slot {
                admission: self.clone(),
                ip: None,
            });
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::AddressFull);
        }
        *n += 1;
        Ok(Slot {
            admission: self.clone(),
            ip: Some(ip),
        })
    }

    /// Connections admitted and not yet ended.
    #[cfg(test)]
    fn admitted(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self
                .admission
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

    #[test]
    fn the_node_limit_counts_every_address_and_frees_on_drop() {
        let adm = Admission::new(2, 0);
        let first = adm.admit(A).expect("first");
        let _second = adm.admit(B).expect("second");
        assert_eq!(adm.admit(A).err(), Some(Refusal::NodeFull));
        assert_eq!(adm.admitted(), 2, "a refusal takes no place");
        drop(first);
        assert!(adm.admit(B).is_ok(), "a freed place is taken again");
    }

    #[test]
    fn the_address_limit_is_per_address() {
        let adm = Admission::new(0, 2);
        let a1 = adm.admit(A).expect("a1");
        let _a2 = adm.admit(A).expect("a2");
        assert_eq!(adm.admit(A).err(), Some(Refusal::AddressFull));
        let _b1 = adm.admit(B).expect("another address is not affected");
        drop(a1);
        let _a3 = adm.admit(A).expect("a freed place of the address");
        assert_eq!(adm.admitted(), 3);
        drop(_a3);
        drop(_a2);
        assert!(
            !adm.per_ip.lock().expect("lock").contains_key(&A),
            "an address without connections is forgotten"
        );
    }
}
