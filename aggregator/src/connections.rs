//! The registry of open agent connections, by host: who is online right now, and the handle
//! the admin API uses to disconnect a revoked host.
//!
//! Invariant: at most one connection per host. A host that connects again replaces its older
//! connection, which is closed with code `REPLACED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use common::ids::HostId;

/// Open connections by host.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<HashMap<HostId, quinn::Connection>>>,
}

impl Connections {
    /// Registers `conn` for `host`, closing and returning whether an older one was replaced.
    pub fn insert(&self, host: HostId, conn: quinn::Connection) -> bool {
        let old = self.lock().insert(host, conn);
        if let Some(old) = &old {
            old.close(
                quinn::VarInt::from_u32(common::proto::code::REPLACED),
                b"replaced by a newer connection",
            );
        }
        old.is_some()
    }

    /// Removes `host` if its registered connection is `conn` (not a newer one).
    pub fn remove(&self, host: &HostId, conn: &quinn::Connection) {
        let mut map = self.lock();
        if map.get(host).is_some_and(|c| c.stable_id() == conn.stable_id()) {
            map.remove(host);
        }
    }

    /// Closes the host's connection with `code`; returns whether one was open.
    pub fn close(&self, host: &HostId, code: u32, reason: &[u8]) -> bool {
        let conn = self.lock().remove(host);
        if let Some(conn) = &conn {
            conn.close(quinn::VarInt::from_u32(code), reason);
        }
        conn.is_some()
    }

    /// Whether the host has an open connection.
    pub fn is_connected(&self, host: &HostId) -> bool {
        self.lock().contains_key(host)
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<HostId, quinn::Connection>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
