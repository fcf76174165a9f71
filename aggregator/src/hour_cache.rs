//! Decoded hourly rollups kept between analytics passes, so that a pass reads only the hour
//! rollups written since the previous one ([`TelemetryStore::hour_changes`]) and the hosts it
//! has not seen yet: its store reads grow with the hosts and the hours that changed, not with
//! the days of history each host has.
//!
//! Correctness:
//! - The cursor is taken before the reads it covers, so a rollup written during a refresh is
//!   read again at the next one rather than missed.
//! - A store that cannot tell what changed (another store instance, or more writes than it
//!   remembers) makes the cache drop everything and read every host whole.
//! - A refresh that fails part-way keeps its old cursor: the next one re-applies the same
//!   changes (reading an hour again is harmless).
//! - Hours older than the window are dropped; a window that starts earlier than the cached one
//!   is read whole.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use common::ids::HostId;

use crate::analytics::HourStats;
use crate::analytics::series::HOUR_MS;
use crate::store::{RollupCursor, StoreError, TelemetryStore};
use crate::views::Resolution;

/// The decoded hours of every host, as of the last refresh.
#[derive(Debug, Default)]
pub struct HourCache {
    cursor: Option<RollupCursor>,
    from_ms: i64,
    hosts: HashMap<String, Arc<BTreeMap<i64, HourStats>>>,
    last: Refresh,
}

/// What one refresh read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refresh {
    /// Hosts read whole (new to the cache, or everything after the store could not tell).
    pub hosts_read_whole: usize,
    /// Hour rollups read and decoded.
    pub hours_read: usize,
}

// === impl HourCache ===

impl HourCache {
    /// Brings the cache up to date for `hosts` and the hours in `[from_ms, until_ms)`.
    pub fn refresh(
        &mut self,
        store: &dyn TelemetryStore,
        hosts: &[HostId],
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Refresh, StoreError> {
        let changes = store.hour_changes(self.cursor)?;
        let mut done = Refresh::default();
        let known: HashSet<&str> = hosts.iter().map(HostId::as_str).collect();
        self.hosts.retain(|h, _| known.contains(h.as_str()));
        match changes.changed {
            Some(changed) if from_ms >= self.from_ms => {
                let changed: BTreeSet<(String, i64)> =
                    changed.into_iter().filter(|(_, t)| (from_ms..until_ms).contains(t)).collect();
                for (host, hour) in changed {
                    // Hosts not cached yet are read whole below.
                    let Some(hours) = self.hosts.get_mut(&host) else { continue };
                    // Copied only if a snapshot still holds them (none does between passes).
                    let hours = Arc::make_mut(hours);
                    let Ok(id) = HostId::new(&host) else { continue };
                    let read = store.rollups(&id, hour, hour + HOUR_MS, Resolution::Hour)?;
                    match read.first() {
                        Some((t, rollup)) => {
                            hours.insert(*t, HourStats::from_rollup(rollup));
                        }
                        None => {
                            hours.remove(&hour);
                        }
                    }
                    done.hours_read += 1;
                }
            }
            _ => self.hosts.clear(),
        }
        for id in hosts {
            if self.hosts.contains_key(id.as_str()) {
                continue;
            }
            let hours: BTreeMap<i64, HourStats> = store
                .rollups(id, from_ms, until_ms, Resolution::Hour)?
                .iter()
                .map(|(t, r)| (*t, HourStats::from_rollup(r)))
                .collect();
            done.hours_read += hours.len();
            done.hosts_read_whole += 1;
            self.hosts.insert(id.to_string(), Arc::new(hours));
        }
        for hours in self.hosts.values_mut() {
            if hours.first_key_value().is_none_or(|(t, _)| *t >= from_ms) {
                continue;
            }
            let hours = Arc::make_mut(hours);
            while let Some(first) = hours.first_entry() {
                if *first.key() >= from_ms {
                    break;
                }
                first.remove();
            }
        }
        self.from_ms = from_ms;
        self.cursor = Some(changes.cursor);
        self.last = done;
        Ok(done)
    }

    /// What the last successful refresh read.
    pub fn last_refresh(&self) -> Refresh {
        self.last
    }

    /// A host's hours (empty for a host not refreshed), shared, not copied.
    pub fn hours(&self, host: &str) -> Arc<BTreeMap<i64, HourStats>> {
        self.hosts.get(host).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use crate::store::tests::reopen;
    use common::proto::{HostSample, Sample, TelemetryBatch};

    fn batch(host: &str, seq: u64, at_ms: &[(i64, f32)]) -> crate::store::IncomingBatch {
        let samples = at_ms
            .iter()
            .enumerate()
            .map(|(i, (t, cpu))| Sample {
                unix_ms: *t,
                sample_index: i as u64,
                host: Some(HostSample {
                    cpu_util_pct: *cpu,
                    interval_ms: 1000,
                    ..HostSample::default()
                }),
                ..Sample::default()
            })
            .collect();
        crate::store::IncomingBatch {
            host: HostId::new(host).unwrap(),
            batch: TelemetryBatch { seq, samples, ..TelemetryBatch::default() },
            received_ms: at_ms.iter().map(|(t, _)| *t).max().unwrap_or(0),
        }
    }

    fn cpu(cache: &HourCache, host: &str) -> Vec<(i64, f64)> {
        cache.hours(host).iter().map(|(t, s)| (*t / HOUR_MS, s.cpu_util_pct.unwrap())).collect()
    }

    #[test]
    fn a_refresh_reads_only_what_changed_and_matches_a_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (a, b) = (HostId::new("a").unwrap(), HostId::new("b").unwrap());
        let hosts = [a.clone(), b.clone()];
        store.commit(&[batch("a", 1, &[(1000, 10.0), (HOUR_MS + 1000, 20.0)])]).unwrap();
        store.commit(&[batch("b", 1, &[(1000, 30.0)])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let mut cache = HourCache::default();
        let first = cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        assert_eq!(first, Refresh { hosts_read_whole: 2, hours_read: 3 });
        assert_eq!(cpu(&cache, "a"), [(0, 10.0), (1, 20.0)]);
        // Nothing new: nothing read.
        assert_eq!(cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap(), Refresh::default());
        // Late data for a's hour 0 and a new hour 2 for b: exactly those two are read.
        store.commit(&[batch("a", 2, &[(2000, 30.0)])]).unwrap();
        store.commit(&[batch("b", 2, &[(2 * HOUR_MS + 1000, 40.0)])]).unwrap();
        store.roll_up(i64::MAX).unwrap();
        let next = cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        assert_eq!(next, Refresh { hosts_read_whole: 0, hours_read: 2 });
        assert_eq!(cpu(&cache, "a"), [(0, 20.0), (1, 20.0)]);
        // The cached view is what a fresh cache reads whole.
        let mut fresh = HourCache::default();
        fresh.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        for h in ["a", "b"] {
            assert_eq!(*cache.hours(h), *fresh.hours(h), "{h}");
        }
        // The window moves on: old hours leave; a host that left the fleet leaves.
        cache.refresh(&store, &[a], HOUR_MS, 10 * HOUR_MS).unwrap();
        assert_eq!(cpu(&cache, "a"), [(1, 20.0)]);
        assert!(cache.hours("b").is_empty());
        // A window that starts earlier again is read whole.
        let wider = cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        assert_eq!(wider.hosts_read_whole, 2);
        assert_eq!(cpu(&cache, "a"), [(0, 20.0), (1, 20.0)]);
    }

    #[test]
    fn a_store_that_cannot_tell_makes_it_read_everything() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = [HostId::new("a").unwrap()];
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.commit(&[batch("a", 1, &[(1000, 10.0)])]).unwrap();
            store.roll_up(i64::MAX).unwrap();
        }
        let mut cache = HourCache::default();
        let store = reopen(dir.path());
        cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        // Another opening of the store: the cursor is foreign, everything is read again.
        drop(store);
        let store = reopen(dir.path());
        let again = cache.refresh(&store, &hosts, 0, 10 * HOUR_MS).unwrap();
        assert_eq!(again, Refresh { hosts_read_whole: 1, hours_read: 1 });
    }
}
