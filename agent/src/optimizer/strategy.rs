//! Choosing among measured candidates: what each strategy optimizes, and the Pareto set.
//!
//! Every strategy chooses only among candidates within the accuracy bound, from figures the
//! search measured:
//! - `latency`: the lowest p99 of a single-row batch;
//! - `throughput`: the most rows/s at any batch size whose p99 meets the latency SLO (every
//!   size when no SLO is given);
//! - `memory`: the smallest peak resident memory the candidate added, measured alone in a child
//!   process (see `footprint`);
//! - `cost`: the lowest cost per 1,000 inferences, `price_per_hour / (rows/s x 3600) x 1000`,
//!   at the throughput strategy's best point (with the host's price, or 1 per hour when none
//!   is known, which ranks the same);
//! - `balanced`: the highest equal-weight geometric mean of three ratios to the best candidate
//!   on each (latency, throughput, memory); 1.0 means best at all three. Without memory figures
//!   for every candidate, of the first two.
//!
//! The Pareto set is every candidate no other one beats on all three of p99, throughput and
//! memory at once (on the first two when memory was not measured for every candidate).

use std::str::FromStr;

use serde::Serialize;

/// What the search optimizes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Lowest p99 at one row.
    Latency,
    /// Most rows/s within the SLO.
    Throughput,
    /// Smallest memory.
    Memory,
    /// Lowest cost per 1,000 inferences.
    Cost,
    /// A documented balance of the three.
    Balanced,
}

impl Strategy {
    /// Every strategy, for help texts and benches.
    pub const ALL: [Self; 5] =
        [Self::Latency, Self::Throughput, Self::Memory, Self::Cost, Self::Balanced];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Latency => "latency",
            Self::Throughput => "throughput",
            Self::Memory => "memory",
            Self::Cost => "cost",
            Self::Balanced => "balanced",
        }
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!("strategy {s:?} is not one of {}", Self::ALL.map(Self::name).join(", "))
        })
    }
}

/// What a strategy needs to know of one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// p99 of a one-row batch, ms.
    pub p99_one_row_ms: f64,
    /// Each measured batch size: (rows per batch, p99 ms, rows/s).
    pub points: Vec<(usize, f64, f64)>,
    /// Peak memory added, bytes, when measured.
    pub memory_bytes: Option<u64>,
}

impl Figures {
    /// The best rows/s whose p99 meets `slo_ms`, with its batch size.
    pub fn best_throughput(&self, slo_ms: Option<f64>) -> Option<(usize, f64)> {
        self.points
            .iter()
            .filter(|(_, p99, _)| slo_ms.is_none_or(|slo| *p99 <= slo))
            .map(|(b, _, rps)| (*b, *rps))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// The outcome of a choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    /// Index of the winner among the candidates given, if any qualified.
    pub winner: Option<usize>,
    /// The winner's batch size where the strategy picks one (throughput, cost).
    pub batch: Option<usize>,
    /// Why, with the figure that decided.
    pub why: String,
    /// Indexes of the Pareto set.
    pub pareto: Vec<usize>,
}

/// Picks the winner among `candidates` (all within the accuracy bound).
pub fn choose(
    strategy: Strategy,
    candidates: &[Figures],
    slo_ms: Option<f64>,
    price_per_hour: Option<f64>,
) -> Choice {
    let pareto = pareto_set(candidates, slo_ms);
    let none = |why: String| Choice { winner: None, batch: None, why, pareto: pareto.clone() };
    if candidates.is_empty() {
        return none("no candidate stayed within the accuracy bound".to_owned());
    }
    let best_by = |score: &dyn Fn(&Figures) -> Option<f64>, lowest: bool| {
        candidates
            .iter()
            .enumerate()
            .filter_map(|(i, f)| score(f).map(|s| (i, s)))
            .min_by(|a, b| if lowest { a.1.total_cmp(&b.1) } else { b.1.total_cmp(&a.1) })
    };
    match strategy {
        Strategy::Latency => {
            let (i, p99) = best_by(&|f| Some(f.p99_one_row_ms), true).unwrap_or((0, f64::NAN));
            Choice {
                winner: Some(i),
                batch: Some(1),
                why: format!("lowest p99 at one row: {p99:.3} ms"),
                pareto,
            }
        }
        Strategy::Throughput => match best_by(&|f| f.best_throughput(slo_ms).map(|t| t.1), false) {
            Some((i, rps)) => Choice {
                winner: Some(i),
                batch: candidates[i].best_throughput(slo_ms).map(|t| t.0),
                why: format!("most rows/s{}: {rps:.1}", slo_text(slo_ms)),
                pareto,
            },
            None => none(format!("no candidate meets the latency SLO{}", slo_text(slo_ms))),
        },
        Strategy::Memory => match best_by(&|f| f.memory_bytes.map(|b| b as f64), true) {
            Some((i, bytes)) => Choice {
                winner: Some(i),
                batch: None,
                why: format!("smallest peak memory added: {:.1} MiB", bytes / 1_048_576.0),
                pareto,
            },
            None => none("memory was not measured (no footprint probe)".to_owned()),
        },
        Strategy::Cost => {
            let price = price_per_hour.unwrap_or(1.0);
            let per_1000 = |f: &Figures| {
                f.best_throughput(slo_ms).map(|(_, rps)| price / (rps * 3600.0) * 1000.0)
            };
            match best_by(&per_1000, true) {
                Some((i, cost)) => Choice {
                    winner: Some(i),
                    batch: candidates[i].best_throughput(slo_ms).map(|t| t.0),
                    why: match price_per_hour {
                        Some(p) => format!(
                            "lowest cost per 1,000 inferences at {p} per hour: {cost:.6}{}",
                            slo_text(slo_ms)
                        ),
                        None => format!(
                            "lowest cost per 1,000 inferences (no host price known: {cost:.6} hours of the host){}",
                            slo_text(slo_ms)
                        ),
                    },
                    pareto,
                },
                None => none(format!("no candidate meets the latency SLO{}", slo_text(slo_ms))),
            }
        }
        Strategy::Balanced => {
            let (i, s) = balanced_scores(candidates, slo_ms)
                .into_iter()
                .enumerate()
                // The first of equals, as the other strategies.
                .min_by(|a, b| b.1.total_cmp(&a.1))
                .unwrap_or((0, 0.0));
            let memory = all_memory(candidates);
            let of = if memory.is_some() {
                "latency, throughput and memory"
            } else {
                "latency and throughput (memory not measured)"
            };
            Choice {
                winner: Some(i),
                batch: candidates[i].best_throughput(slo_ms).map(|t| t.0),
                why: format!(
                    "highest balance of {of} (geometric mean of the ratios to the best): {s:.3}"
                ),
                pareto,
            }
        }
    }
}

/// Each candidate's balanced score: the geometric mean of its ratios to the best p99, the best
/// throughput within the SLO and (when every candidate's was measured) the smallest memory.
fn balanced_scores(candidates: &[Figures], slo_ms: Option<f64>) -> Vec<f64> {
    let best_p99 = candidates.iter().map(|f| f.p99_one_row_ms).fold(f64::INFINITY, f64::min);
    let best_rps = candidates
        .iter()
        .filter_map(|f| f.best_throughput(slo_ms).map(|t| t.1))
        .fold(0.0, f64::max);
    let best_mem = all_memory(candidates)
        .map(|m| m.iter().map(|b| (*b).max(1) as f64).fold(f64::INFINITY, f64::min));
    candidates
        .iter()
        .map(|f| {
            let rps = f.best_throughput(slo_ms).map_or(0.0, |t| t.1);
            let mut parts = vec![
                best_p99 / f.p99_one_row_ms.max(1e-9),
                if best_rps > 0.0 { rps / best_rps } else { 0.0 },
            ];
            if let (Some(best), Some(mine)) = (best_mem, f.memory_bytes) {
                parts.push(best / mine.max(1) as f64);
            }
            let n = parts.len() as f64;
            parts.iter().product::<f64>().powf(1.0 / n)
        })
        .collect()
}

/// The goal "gain at least `min_improvement` over the baseline": when `choice`'s winner is not
/// the baseline (`candidates[baseline]`) and beats it by less than that share in the
/// strategy's own measure (p99 for latency, rows/s within the SLO for throughput and cost,
/// peak memory for memory, the balanced score for balanced), there is no winner and the model
/// stays as it is; the reason gives the gain.
pub fn hold_to_min_improvement(
    mut choice: Choice,
    strategy: Strategy,
    candidates: &[Figures],
    slo_ms: Option<f64>,
    baseline: usize,
    min_improvement: f64,
) -> Choice {
    let Some(winner) = choice.winner else { return choice };
    if winner == baseline || min_improvement <= 0.0 || baseline >= candidates.len() {
        return choice;
    }
    let (w, b) = (&candidates[winner], &candidates[baseline]);
    let (gain, measure) = match strategy {
        Strategy::Latency => (b.p99_one_row_ms / w.p99_one_row_ms - 1.0, "p99 at one row"),
        Strategy::Throughput | Strategy::Cost => {
            let rps = |f: &Figures| f.best_throughput(slo_ms).map_or(0.0, |t| t.1);
            (rps(w) / rps(b) - 1.0, "rows/s")
        }
        Strategy::Memory => match (w.memory_bytes, b.memory_bytes) {
            (Some(wm), Some(bm)) => (bm as f64 / wm.max(1) as f64 - 1.0, "peak memory"),
            _ => (f64::NAN, "peak memory"),
        },
        Strategy::Balanced => {
            let scores = balanced_scores(candidates, slo_ms);
            (scores[winner] / scores[baseline] - 1.0, "balanced score")
        }
    };
    // NaN (a figure missing) counts as no gain.
    if gain >= min_improvement {
        return choice;
    }
    choice.why = format!(
        "the best candidate ({}) gains {:.1} % over the baseline in {measure}, less than the {:.1} % asked (min_improvement): the model stays as it is",
        choice.why,
        gain * 100.0,
        min_improvement * 100.0
    );
    choice.winner = None;
    choice.batch = None;
    choice
}

/// " within the S ms p99 SLO", or nothing without one.
pub fn slo_text(slo_ms: Option<f64>) -> String {
    slo_ms.map(|s| format!(" within the {s} ms p99 SLO")).unwrap_or_default()
}

/// Every candidate's memory, if every one was measured.
fn all_memory(candidates: &[Figures]) -> Option<Vec<u64>> {
    candidates.iter().map(|f| f.memory_bytes).collect()
}

/// Candidates no other beats on p99, throughput and memory all at once (ties do not beat).
pub fn pareto_set(candidates: &[Figures], slo_ms: Option<f64>) -> Vec<usize> {
    let memory = all_memory(candidates).is_some();
    let key = |f: &Figures| {
        let m = if memory { f.memory_bytes.unwrap_or(0) } else { 0 };
        (f.p99_one_row_ms, f.best_throughput(slo_ms).map_or(0.0, |t| t.1), m)
    };
    (0..candidates.len())
        .filter(|&i| {
            let (p, t, m) = key(&candidates[i]);
            !candidates.iter().enumerate().any(|(j, other)| {
                let (q, u, n) = key(other);
                j != i && q <= p && u >= t && n <= m && (q < p || u > t || n < m)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(p99: f64, points: &[(usize, f64, f64)], mib: u64) -> Figures {
        Figures { p99_one_row_ms: p99, points: points.to_vec(), memory_bytes: Some(mib << 20) }
    }

    #[test]
    fn each_strategy_picks_by_its_own_figure() {
        let fast = figures(1.0, &[(1, 1.0, 1000.0), (8, 12.0, 2000.0)], 100);
        let wide = figures(2.0, &[(1, 2.0, 500.0), (8, 6.0, 3000.0)], 50);
        let small = figures(3.0, &[(1, 3.0, 333.0)], 10);
        let all = [fast, wide, small];
        assert_eq!(choose(Strategy::Latency, &all, None, None).winner, Some(0));
        let t = choose(Strategy::Throughput, &all, None, None);
        assert_eq!((t.winner, t.batch), (Some(1), Some(8)));
        // A 5 ms SLO rules out both batches of 8: the fast one's single rows win.
        let slo = choose(Strategy::Throughput, &all, Some(5.0), None);
        assert_eq!((slo.winner, slo.batch), (Some(0), Some(1)), "{}", slo.why);
        assert_eq!(choose(Strategy::Memory, &all, None, None).winner, Some(2));
        let cost = choose(Strategy::Cost, &all, None, Some(2.0));
        assert_eq!(cost.winner, Some(1));
        assert!(cost.why.contains("at 2 per hour"), "{}", cost.why);
        assert_eq!(choose(Strategy::Balanced, &all, None, None).winner, Some(1));
        assert_eq!(pareto_set(&all, None), vec![0, 1, 2]);
        let none = choose(Strategy::Throughput, &all, Some(0.5), None);
        assert_eq!(none.winner, None);
        assert!(none.why.contains("SLO"), "{}", none.why);
        // Without memory figures the memory strategy says so and balance uses two figures.
        let unmeasured: Vec<Figures> =
            all.iter().cloned().map(|f| Figures { memory_bytes: None, ..f }).collect();
        let m = choose(Strategy::Memory, &unmeasured, None, None);
        assert_eq!(m.winner, None);
        assert!(m.why.contains("not measured"), "{}", m.why);
        let b = choose(Strategy::Balanced, &unmeasured, None, None);
        assert!(b.why.contains("memory not measured"), "{}", b.why);
    }

    #[test]
    fn a_winner_that_gains_less_than_asked_leaves_the_model_as_it_is() {
        // Baseline: 2 ms, 500 rows/s, 40 MiB; candidate: 1.8 ms (11 % faster), 520 rows/s
        // (4 %), 20 MiB (2x smaller).
        let candidates =
            [figures(2.0, &[(1, 2.0, 500.0)], 40), figures(1.8, &[(1, 1.8, 520.0)], 20)];
        let hold = |strategy: Strategy, min: f64| {
            let choice = choose(strategy, &candidates, None, None);
            assert_eq!(choice.winner, Some(1), "{strategy:?}");
            hold_to_min_improvement(choice, strategy, &candidates, None, 0, min)
        };
        assert_eq!(hold(Strategy::Latency, 0.10).winner, Some(1), "11 % >= 10 %");
        let held = hold(Strategy::Latency, 0.20);
        assert_eq!((held.winner, held.batch), (None, None));
        assert!(
            held.why.contains("gains 11.1 % over the baseline in p99 at one row"),
            "{}",
            held.why
        );
        assert!(held.why.contains("less than the 20.0 % asked"), "{}", held.why);
        assert_eq!(hold(Strategy::Throughput, 0.05).winner, None, "4 % < 5 %");
        assert_eq!(hold(Strategy::Cost, 0.03).winner, Some(1));
        assert_eq!(hold(Strategy::Memory, 0.9).winner, Some(1), "2x smaller is +100 %");
        assert_eq!(hold(Strategy::Memory, 1.5).winner, None);
        assert_eq!(hold(Strategy::Balanced, 0.0).winner, Some(1), "no goal: any gain");
        // The baseline winning needs no gain.
        let baseline_wins =
            Choice { winner: Some(0), batch: Some(1), why: String::new(), pareto: vec![] };
        let kept =
            hold_to_min_improvement(baseline_wins, Strategy::Latency, &candidates, None, 0, 5.0);
        assert_eq!(kept.winner, Some(0));
    }

    #[test]
    fn a_candidate_beaten_on_everything_is_not_in_the_pareto_set() {
        let good = figures(1.0, &[(1, 1.0, 1000.0)], 10);
        let worse = figures(2.0, &[(1, 2.0, 500.0)], 20);
        assert_eq!(pareto_set(&[good, worse], None), vec![0]);
        assert!("fastest".parse::<Strategy>().unwrap_err().contains("latency, throughput"));
        assert_eq!("cost".parse::<Strategy>(), Ok(Strategy::Cost));
    }
}
