//! Splitting the machine's cores between the server under test and its load generator, so a
//! served measurement is not slowed by the client's own CPU and compares with a raw run on the
//! same cores.
//!
//! The bench pins its main thread to the server's cores before it starts anything: every
//! thread started later (the runtime, instance threads, onnxruntime's pool, child processes)
//! inherits them. Each client thread moves itself to the client's cores when it starts.

use anyhow::{Context as _, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// Which cores the server and the clients run on.
#[derive(Debug, Clone)]
pub struct CoreSplit {
    /// The server's cores (and the raw runs').
    pub server: Vec<usize>,
    /// The load generator's cores.
    pub client: Vec<usize>,
}

impl CoreSplit {
    /// Gives the last `client_cores` of the cores this process may use to the clients and the
    /// rest to the server, and pins the calling thread to the server's. `None` when
    /// `client_cores` is 0 (no pinning: everything shares every core).
    pub fn apply(client_cores: usize) -> anyhow::Result<Option<Self>> {
        if client_cores == 0 {
            return Ok(None);
        }
        let cores = allowed_cores()?;
        if cores.len() <= client_cores {
            bail!(
                "--client-cores {client_cores}: this process may run on {} cores, so none would be left for the server; use fewer, or 0 to share them",
                cores.len()
            );
        }
        let (server, client) = cores.split_at(cores.len() - client_cores);
        let split = Self { server: server.to_vec(), client: client.to_vec() };
        pin_current_thread(&split.server)?;
        Ok(Some(split))
    }

    /// Moves the calling (client) thread to the client's cores.
    pub fn pin_client(&self) -> anyhow::Result<()> {
        pin_current_thread(&self.client)
    }

    /// `server cores [0], client cores [1]`, for the report.
    pub fn describe(&self) -> String {
        format!("server on cores {:?}, load generator on cores {:?}", self.server, self.client)
    }
}

/// The cores the calling thread may run on.
pub fn allowed_cores() -> anyhow::Result<Vec<usize>> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("reading this thread's CPU set")?;
    Ok((0..CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect())
}

/// Pins the calling thread (and what it starts afterwards) to `cores`.
pub fn pin_current_thread(cores: &[usize]) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    for &c in cores {
        set.set(c).with_context(|| format!("core {c} is beyond the CPU set's size"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to cores {cores:?}"))
}

/// Pins a client thread if there is a split; a failure is reported and the thread runs
/// unpinned.
pub fn pin_client(split: Option<&CoreSplit>) {
    if let Some(split) = split
        && let Err(e) = split.pin_client()
    {
        eprintln!("a client thread stays unpinned: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_pins_the_caller_to_the_server_cores_and_children_inherit_them() {
        let cores = allowed_cores().expect("affinity").len();
        if cores < 2 {
            assert!(CoreSplit::apply(1).is_err(), "one core cannot be split");
            return;
        }
        // On its own thread, so the test harness's threads keep their CPU set.
        std::thread::spawn(|| {
            let split = CoreSplit::apply(1).expect("split").expect("some");
            assert_eq!(split.client.len(), 1);
            assert!(!split.server.is_empty());
            let count = || allowed_cores().expect("affinity").len();
            let inherited = std::thread::spawn(count).join().expect("join");
            assert_eq!(inherited, split.server.len());
            let client = split.clone();
            let on_client = std::thread::spawn(move || {
                client.pin_client().expect("pin");
                count()
            })
            .join()
            .expect("join");
            assert_eq!(on_client, 1);
            assert!(
                CoreSplit::apply(split.server.len() + 1).is_err(),
                "nothing left for the server"
            );
        })
        .join()
        .expect("the split thread");
    }
}
