//! The adaptive batching controller: pure decision logic, no clock, no I/O, no threads.
//!
//! It is fed what the instance threads measure (each batch's rows and compute time, whether
//! other requests were waiting when it went, each request's end-to-end latency) and, every
//! [`WINDOW_BATCHES`] batches, decides the batch size and queue delay the batcher uses next.
//!
//! Rules, in order, at the end of each window:
//! 1. p95 latency over the SLO: the size in force is marked as missing it and the size halves
//!    (never below the lower bound).
//! 2. No queue pressure (fewer than half the batches had another request waiting): batching
//!    cannot help, so the size returns to the lower bound (zero delay at size 1). What was
//!    measured is kept for when pressure returns.
//! 3. Queue pressure: the size with the best measured rows/s (per-row compute time, an EWMA kept
//!    per batch size; a larger size must beat a smaller one by [`GAIN_MARGIN`]) that has not
//!    missed the SLO is chosen; if its double (within bounds) has no fresh measurement, that
//!    double is tried for one window instead.
//!
//! The first batch of each size is not counted: on tract it includes building that size's
//! plan. Measurements older than [`STALE_WINDOWS`] windows are tried again, so a model whose costs
//! change (or a size rejected under light load) is re-examined. The queue delay is 0 at size 1
//! and otherwise about one row's compute time, capped by the bound.
//!
//! With `adaptive` off the controller still measures but always answers the configured maximum
//! size and delay.

use std::collections::BTreeMap;
use std::time::Duration;

/// Batches per decision window.
pub const WINDOW_BATCHES: u32 = 16;
/// A measurement this many windows old is tried again.
pub const STALE_WINDOWS: u64 = 64;
/// A larger batch size is preferred only when its rows/s beat a smaller one's by this factor.
pub const GAIN_MARGIN: f64 = 1.10;
/// Batches of one size needed before its per-row cost counts as measured.
const MIN_SAMPLES: u32 = 3;
/// Latencies kept per window for the p95.
const MAX_LATENCIES: usize = 4096;

/// Limits the controller stays within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Smallest batch size it uses (at least 1).
    pub min_batch_size: usize,
    /// Largest batch size it uses; with `adaptive` off, the size in force.
    pub max_batch_size: usize,
    /// Longest queue delay it uses; with `adaptive` off, the delay in force.
    pub max_queue_delay: Duration,
    /// p95 end-to-end latency to stay under; `None` for none.
    pub latency_slo: Option<Duration>,
}

/// What the batcher should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest the oldest request waits for company.
    pub queue_delay: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct SizeCost {
    /// EWMA of compute time per row, microseconds.
    per_row_us: f64,
    samples: u32,
    /// Window in which it was last measured.
    measured_in: u64,
    /// Window in which its p95 missed the SLO, if it did.
    missed_slo_in: Option<u64>,
    /// Window in which it was last tried (measured enough or not).
    tried_in: Option<u64>,
    /// A first batch of this size ran (and was not counted).
    warmed: bool,
}

#[derive(Debug, Default)]
struct Window {
    batches: u32,
    pressured: u32,
    latencies_us: Vec<u64>,
}

/// The per-model controller.
#[derive(Debug)]
pub struct Controller {
    adaptive: bool,
    bounds: Bounds,
    current: usize,
    costs: BTreeMap<usize, SizeCost>,
    window: Window,
    windows: u64,
    decisions: u64,
}

impl Controller {
    /// A controller starting at the lower bound (adaptive) or the maximum (fixed).
    pub fn new(adaptive: bool, bounds: Bounds) -> Self {
        let bounds = sane(bounds);
        let current = if adaptive { bounds.min_batch_size } else { bounds.max_batch_size };
        Self {
            adaptive,
            bounds,
            current,
            costs: BTreeMap::new(),
            window: Window::default(),
            windows: 0,
            decisions: 0,
        }
    }

    /// Whether it tunes.
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    /// Its bounds.
    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Size changes it has made.
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The setting in force.
    pub fn setting(&self) -> Setting {
        if !self.adaptive {
            return Setting {
                batch_size: self.bounds.max_batch_size,
                queue_delay: self.bounds.max_queue_delay,
            };
        }
        let batch_size = self.current;
        let queue_delay = if batch_size <= 1 {
            Duration::ZERO
        } else {
            let per_row = self.cost(batch_size).or_else(|| self.cost(1)).unwrap_or(0.0);
            Duration::try_from_secs_f64(per_row / 1e6)
                .unwrap_or(Duration::ZERO)
                .min(self.bounds.max_queue_delay)
        };
        Setting { batch_size, queue_delay }
    }

    /// Changes mode and bounds; the size in force is clamped into the new bounds (an adaptive
    /// controller switched on starts from its lower bound). Measurements are kept.
    pub fn reconfigure(&mut self, adaptive: bool, bounds: Bounds) {
        let bounds = sane(bounds);
        if adaptive && !self.adaptive {
            self.current = bounds.min_batch_size;
        }
        self.adaptive = adaptive;
        self.bounds = bounds;
        self.current = self.current.clamp(bounds.min_batch_size, bounds.max_batch_size);
        if !adaptive {
            self.current = bounds.max_batch_size;
        }
        self.window = Window::default();
    }

    /// Whether a batch of `rows` has run before (the first one of each size builds a plan).
    pub fn warmed(&self, rows: usize) -> bool {
        self.costs.get(&rows).is_some_and(|c| c.warmed)
    }

    /// Records one request's end-to-end latency.
    pub fn observe_latency(&mut self, latency: Duration) {
        if self.window.latencies_us.len() < MAX_LATENCIES {
            self.window.latencies_us.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// Records one batch: its rows, its compute time, and how many requests were waiting when
    /// it went (its own included). Returns the new setting when the window's decision changed
    /// it.
    pub fn observe_batch(
        &mut self,
        rows: usize,
        compute: Duration,
        waiting: usize,
    ) -> Option<Setting> {
        if rows > 0 {
            let per_row = compute.as_secs_f64() * 1e6 / rows as f64;
            let window = self.windows;
            let c = self.costs.entry(rows).or_default();
            if c.warmed {
                c.per_row_us =
                    if c.samples == 0 { per_row } else { c.per_row_us * 0.75 + per_row * 0.25 };
                c.samples = c.samples.saturating_add(1);
                c.measured_in = window;
            } else {
                // The first batch of a size builds its plan (tract compiles one per shape):
                // not a measure of running it.
                c.warmed = true;
            }
        }
        self.window.batches += 1;
        if waiting > 1 {
            self.window.pressured += 1;
        }
        if self.window.batches < WINDOW_BATCHES {
            return None;
        }
        let before = self.setting();
        self.decide();
        let after = self.setting();
        (after != before).then_some(after)
    }

    fn decide(&mut self) {
        let window = std::mem::take(&mut self.window);
        let now = self.windows;
        self.windows += 1;
        if !self.adaptive {
            return;
        }
        let before = self.current;
        if let Some(c) = self.costs.get_mut(&before) {
            c.tried_in = Some(now);
        } else {
            self.costs.insert(before, SizeCost { tried_in: Some(now), ..SizeCost::default() });
        }
        let p95 = p95(window.latencies_us);
        if let (Some(slo), Some(p95)) = (self.bounds.latency_slo, p95)
            && p95 > u64::try_from(slo.as_micros()).unwrap_or(u64::MAX)
        {
            if let Some(c) = self.costs.get_mut(&before) {
                c.missed_slo_in = Some(now);
            }
            self.current = (before / 2).max(self.bounds.min_batch_size);
        } else if window.pressured * 2 < window.batches {
            self.current = self.bounds.min_batch_size;
        } else {
            let best = self.best(now);
            let up = (best * 2).min(self.bounds.max_batch_size);
            self.current = if up > best && self.worth_trying(up, now) { up } else { best };
        }
        if self.current != before {
            self.decisions += 1;
        }
    }

    /// The fresh, SLO-keeping size with the best rows/s, smaller sizes winning within the
    /// margin; the lower bound when nothing is measured.
    fn best(&self, now: u64) -> usize {
        let mut best = self.bounds.min_batch_size;
        let mut best_cost = self.fresh_cost(best, now);
        for (&size, _) in self.costs.range(self.bounds.min_batch_size..=self.bounds.max_batch_size)
        {
            let Some(cost) = self.fresh_cost(size, now) else { continue };
            if self.missed_slo(size, now) {
                continue;
            }
            match best_cost {
                Some(b) if cost * GAIN_MARGIN >= b => {}
                _ => {
                    best = size;
                    best_cost = Some(cost);
                }
            }
        }
        best
    }

    fn cost(&self, size: usize) -> Option<f64> {
        self.costs.get(&size).filter(|c| c.samples >= MIN_SAMPLES).map(|c| c.per_row_us)
    }

    fn fresh_cost(&self, size: usize, now: u64) -> Option<f64> {
        let c = self.costs.get(&size)?;
        (c.samples >= MIN_SAMPLES && now.saturating_sub(c.measured_in) < STALE_WINDOWS)
            .then_some(c.per_row_us)
    }

    fn missed_slo(&self, size: usize, now: u64) -> bool {
        self.costs
            .get(&size)
            .and_then(|c| c.missed_slo_in)
            .is_some_and(|w| now.saturating_sub(w) < STALE_WINDOWS)
    }

    /// Whether `size` has not been tried recently, measured or not.
    fn worth_trying(&self, size: usize, now: u64) -> bool {
        if self.missed_slo(size, now) {
            return false;
        }
        if self.fresh_cost(size, now).is_some() {
            return false;
        }
        self.costs
            .get(&size)
            .and_then(|c| c.tried_in)
            .is_none_or(|w| now.saturating_sub(w) >= STALE_WINDOWS)
    }
}

fn sane(b: Bounds) -> Bounds {
    let max_batch_size = b.max_batch_size.max(1);
    Bounds { min_batch_size: b.min_batch_size.clamp(1, max_batch_size), max_batch_size, ..b }
}

fn p95(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = (v.len() * 95).div_ceil(100).saturating_sub(1);
    v.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max: usize, slo_ms: Option<u64>) -> Bounds {
        Bounds {
            min_batch_size: 1,
            max_batch_size: max,
            max_queue_delay: Duration::from_micros(500),
            latency_slo: slo_ms.map(Duration::from_millis),
        }
    }

    /// Runs `windows` windows of saturating load (always more waiting than a batch takes):
    /// each batch has the size in force, costs `rows * per_row_us(rows)`, and each request's
    /// latency is twice its batch's compute (one batch queued ahead).
    fn saturate(c: &mut Controller, windows: u32, per_row_us: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut sizes = Vec::new();
        for _ in 0..windows * WINDOW_BATCHES {
            let rows = c.setting().batch_size;
            let compute = Duration::from_secs_f64(rows as f64 * per_row_us(rows) / 1e6);
            for _ in 0..rows {
                c.observe_latency(compute * 2);
            }
            c.observe_batch(rows, compute, rows + 4);
            sizes.push(c.setting().batch_size);
        }
        sizes
    }

    #[test]
    fn rising_cost_per_row_settles_at_one() {
        // OCR-like on tract: 1.2 ms alone, far slower per row in batches.
        let mut c = Controller::new(true, bounds(8, None));
        let ocr = |rows: usize| if rows == 1 { 1200.0 } else { 5000.0 };
        let sizes = saturate(&mut c, 40, ocr);
        assert!(sizes.contains(&2), "2 was tried: {sizes:?}");
        assert!(!sizes.contains(&4), "a worse size is not pushed further: {sizes:?}");
        let tail = &sizes[sizes.len() - 20 * WINDOW_BATCHES as usize..];
        assert!(tail.iter().all(|s| *s == 1), "settled at 1: {tail:?}");
        assert_eq!(c.setting(), Setting { batch_size: 1, queue_delay: Duration::ZERO });
    }

    #[test]
    fn falling_cost_per_row_grows_to_the_bound() {
        // silero-like: fixed per-call overhead, cheap rows.
        let mut c = Controller::new(true, bounds(8, None));
        let cheap = |rows: usize| 100.0 + 900.0 / rows as f64;
        let sizes = saturate(&mut c, 20, cheap);
        assert_eq!(c.setting().batch_size, 8, "{sizes:?}");
        assert!(c.setting().queue_delay > Duration::ZERO);
        assert!(c.setting().queue_delay <= Duration::from_micros(500));
    }

    #[test]
    fn slo_caps_the_size() {
        // Batching pays, but a batch of 8 takes 8 x 212 us = 1.7 ms: latency 3.4 ms > 3 ms,
        // while a batch of 4 (4 x 325 us, latency 2.6 ms) keeps it.
        let mut c = Controller::new(true, bounds(8, Some(3)));
        let cheap = |rows: usize| 100.0 + 900.0 / rows as f64;
        let sizes = saturate(&mut c, 30, cheap);
        let tail = &sizes[sizes.len() - 5 * WINDOW_BATCHES as usize..];
        assert!(tail.iter().all(|s| *s == 4), "largest size under the SLO: {tail:?}");
    }

    #[test]
    fn no_queue_pressure_stays_at_the_lower_bound() {
        let mut c = Controller::new(true, bounds(8, None));
        for _ in 0..10 * WINDOW_BATCHES {
            c.observe_latency(Duration::from_millis(1));
            assert_eq!(c.observe_batch(1, Duration::from_millis(1), 1), None);
        }
        assert_eq!(c.setting(), Setting { batch_size: 1, queue_delay: Duration::ZERO });
        // Grown under load, it returns to 1 when the load goes.
        saturate(&mut c, 10, |rows| 100.0 + 900.0 / rows as f64);
        assert!(c.setting().batch_size > 1);
        for _ in 0..WINDOW_BATCHES {
            c.observe_batch(1, Duration::from_millis(1), 1);
        }
        assert_eq!(c.setting().batch_size, 1);
        assert_eq!(c.setting().queue_delay, Duration::ZERO);
    }

    #[test]
    fn fixed_mode_answers_the_configured_setting_and_bounds_are_kept() {
        let mut c = Controller::new(false, bounds(8, None));
        saturate(&mut c, 5, |_| 1000.0);
        assert_eq!(c.setting(), Setting { batch_size: 8, queue_delay: Duration::from_micros(500) });
        c.reconfigure(true, Bounds { min_batch_size: 2, ..bounds(4, None) });
        assert_eq!(c.setting().batch_size, 2, "adaptive starts at its lower bound");
        let odd = Controller::new(true, Bounds { min_batch_size: 9, ..bounds(0, None) });
        assert_eq!(odd.setting().batch_size, 1, "nonsense bounds are made sane");
    }

    #[test]
    fn the_first_batch_of_a_size_is_not_counted() {
        let mut c = Controller::new(true, bounds(8, None));
        // Size 2's first batch builds a plan (50 ms); its later batches are cheap per row.
        let mut first_two = true;
        for _ in 0..20 * WINDOW_BATCHES {
            let rows = c.setting().batch_size;
            let mut compute = Duration::from_micros(rows as u64 * (100 + 900 / rows as u64));
            if rows == 2 && first_two {
                compute = Duration::from_millis(50);
                first_two = false;
            }
            c.observe_batch(rows, compute, 8);
        }
        assert_eq!(c.setting().batch_size, 8, "the plan build did not count against 2");
    }

    #[test]
    fn p95_picks_the_right_rank() {
        assert_eq!(p95(vec![]), None);
        assert_eq!(p95((1..=100).collect()), Some(95));
        assert_eq!(p95(vec![7]), Some(7));
    }
}
