//! Resource allocation and placement: who gets a shared host's capacity, and where instances go
//! that their host cannot hold. Pure: the autoscaler ([`super::autoscaler`]) gathers the hosts'
//! capacity (GPU memory from NVML's totals, CPU cores, from each agent's inventory) and the
//! scaling decisions, and turns what comes out into directives.
//!
//! Allocation on one host ([`allocate`]), for the models whose policies declare `[resources]`:
//! 1. Claims are ordered by priority (highest first), then demand (highest first), then name.
//! 2. First pass: each claim gets up to its floor (`min_instances`), in that order, as far as
//!    the capacity left holds them.
//! 3. Second pass: in the same order, each gets the rest of what its decision wants, as far as
//!    the capacity left holds them.
//!
//! A claim that gets less than it wants has a shortfall. [`place`] puts a shortfall on other
//! hosts that can hold it: the cheapest per instance first (the host's catalog price over the
//! instances of this model its free capacity holds; hosts without a price last; ties by name).
//! What no host can hold is left for the fleet-size actuator ([`super::fleet`]).
//!
//! A resource a policy does not declare does not limit it; models without a policy are not
//! counted (their use is not known to the aggregator).

use serde::{Deserialize, Serialize};

use super::policy::Resources;

/// What a host has free (or has, before allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// GPU memory, MiB (0 on a host without GPUs).
    pub gpu_memory_mb: f64,
    /// CPU cores.
    pub cpu_cores: f64,
}

impl Capacity {
    /// How many instances needing `per` fit; `u32::MAX` when `per` declares nothing.
    pub fn fits(&self, per: &Resources) -> u32 {
        let dims = [(per.gpu_memory_mb, self.gpu_memory_mb), (per.cpu_cores, self.cpu_cores)];
        dims.iter()
            .filter_map(|(need, have)| need.filter(|n| *n > 0.0).map(|n| whole(have / n)))
            .min()
            .unwrap_or(u32::MAX)
    }

    /// Takes `n` instances of `per` off the free capacity.
    fn take(&mut self, n: u32, per: &Resources) {
        let n = f64::from(n);
        self.gpu_memory_mb -= n * per.gpu_memory_mb.unwrap_or(0.0);
        self.cpu_cores -= n * per.cpu_cores.unwrap_or(0.0);
    }
}

/// The whole instances in `x`: rounded down, 0 for a negative or NaN `x`, at most `u32::MAX`.
pub fn whole(x: f64) -> u32 {
    let x = x.floor();
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // Within 0..u32::MAX and whole, checked just above: the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = x as u32;
        n
    }
}

/// One model's claim on a host's capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// Model.
    pub model: String,
    /// Its policy's priority.
    pub priority: u32,
    /// Its demand on this host, requests/s.
    pub demand_rps: f64,
    /// Instances granted first, before any claim's extras (`min_instances`).
    pub floor: u32,
    /// Instances its decision wants.
    pub wanted: u32,
    /// What one instance takes.
    pub per_instance: Resources,
}

/// The instances each claim gets on a host of `capacity` (same order as `claims`), and the
/// capacity left.
pub fn allocate(capacity: Capacity, claims: &[Claim]) -> (Vec<u32>, Capacity) {
    let mut order: Vec<usize> = (0..claims.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&claims[a], &claims[b]);
        y.priority
            .cmp(&x.priority)
            .then(y.demand_rps.total_cmp(&x.demand_rps))
            .then_with(|| x.model.cmp(&y.model))
    });
    let mut left = capacity;
    let mut granted = vec![0u32; claims.len()];
    for pass_floor in [true, false] {
        for &i in &order {
            let c = &claims[i];
            let goal = if pass_floor { c.floor.min(c.wanted) } else { c.wanted };
            let more = goal.saturating_sub(granted[i]).min(left.fits(&c.per_instance));
            left.take(more, &c.per_instance);
            granted[i] += more;
        }
    }
    (granted, left)
}

/// A host a shortfall may go to.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Host id.
    pub host: String,
    /// Its free capacity.
    pub free: Capacity,
    /// Its hourly price from the catalog, when known.
    pub price_per_hour: Option<f64>,
}

/// Puts `shortfall` instances needing `per` on `candidates`, cheapest per instance first;
/// returns `(host, instances)` per host used and the instances no candidate holds. Takes what
/// it places off the candidates' free capacity.
pub fn place(
    shortfall: u32,
    per: &Resources,
    candidates: &mut [Candidate],
) -> (Vec<(String, u32)>, u32) {
    let per_instance_price = |c: &Candidate| {
        let fits = c.free.fits(per).min(shortfall.max(1));
        c.price_per_hour.filter(|_| fits > 0).map(|p| p / f64::from(fits))
    };
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&candidates[a], &candidates[b]);
        match (per_instance_price(x), per_instance_price(y)) {
            (Some(p), Some(q)) => p.total_cmp(&q),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then_with(|| x.host.cmp(&y.host))
    });
    let mut left = shortfall;
    let mut out = Vec::new();
    for i in order {
        if left == 0 {
            break;
        }
        let c = &mut candidates[i];
        let n = left.min(c.free.fits(per));
        if n > 0 {
            c.free.take(n, per);
            out.push((c.host.clone(), n));
            left -= n;
        }
    }
    (out, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(mb: f64) -> Resources {
        Resources { gpu_memory_mb: Some(mb), cpu_cores: None }
    }

    fn claim(model: &str, priority: u32, demand: f64, floor: u32, wanted: u32) -> Claim {
        Claim {
            model: model.into(),
            priority,
            demand_rps: demand,
            floor,
            wanted,
            per_instance: gpu(10_000.0),
        }
    }

    const H100: Capacity = Capacity { gpu_memory_mb: 81_559.0, cpu_cores: 26.0 };

    #[test]
    fn a_host_with_room_grants_every_claim_in_full() {
        let claims = [claim("a", 100, 5.0, 1, 3), claim("b", 100, 1.0, 1, 2)];
        let (granted, left) = allocate(H100, &claims);
        assert_eq!(granted, [3, 2]);
        assert_eq!(left.gpu_memory_mb, 31_559.0);
        assert_eq!(left.cpu_cores, 26.0, "cpu_cores undeclared: not taken");
    }

    #[test]
    fn the_higher_priority_gets_its_extras_first_but_every_floor_comes_before_extras() {
        // 8 slots of 10 GB: "hi" wants 7, "lo" wants 4 with a floor of 2.
        let claims = [claim("lo", 10, 50.0, 2, 4), claim("hi", 500, 1.0, 1, 7)];
        let (granted, _) = allocate(H100, &claims);
        assert_eq!(granted, [2, 6], "lo keeps its floor; hi gets the other 6 slots");
        // Equal priority: the busier model first.
        let claims = [claim("quiet", 100, 1.0, 0, 8), claim("busy", 100, 90.0, 0, 5)];
        assert_eq!(allocate(H100, &claims).0, [3, 5]);
    }

    #[test]
    fn the_tightest_resource_limits_and_undeclared_resources_do_not() {
        let per = Resources { gpu_memory_mb: Some(1_000.0), cpu_cores: Some(4.0) };
        assert_eq!(H100.fits(&per), 6, "26 cores / 4");
        assert_eq!(H100.fits(&Resources::default()), u32::MAX);
        let cpu_only = Capacity { gpu_memory_mb: 0.0, cpu_cores: 2.0 };
        assert_eq!(cpu_only.fits(&gpu(1.0)), 0, "no GPU memory on a CPU host");
        assert_eq!(cpu_only.fits(&Resources { gpu_memory_mb: None, cpu_cores: Some(0.5) }), 4);
    }

    #[test]
    fn a_shortfall_goes_to_the_cheapest_slot_then_the_unpriced_and_the_rest_is_unmet() {
        let per = gpu(40_000.0);
        let mut cands = vec![
            Candidate { host: "unpriced".into(), free: H100, price_per_hour: None },
            // 2 slots at 8/h: 4 per instance.
            Candidate { host: "big".into(), free: H100, price_per_hour: Some(8.0) },
            // 1 slot at 3/h.
            Candidate {
                host: "small".into(),
                free: Capacity { gpu_memory_mb: 45_000.0, cpu_cores: 8.0 },
                price_per_hour: Some(3.0),
            },
            Candidate { host: "full".into(), free: Capacity::default(), price_per_hour: Some(0.1) },
        ];
        let (placed, unmet) = place(7, &per, &mut cands);
        assert_eq!(
            placed,
            [("small".to_owned(), 1), ("big".to_owned(), 2), ("unpriced".to_owned(), 2)]
        );
        assert_eq!(unmet, 2);
        assert_eq!(cands[1].free.gpu_memory_mb, 1_559.0, "placements take capacity");
        let (placed, unmet) = place(1, &per, &mut cands);
        assert!(placed.is_empty() && unmet == 1, "nothing left anywhere: {placed:?}");
    }
}
