//! The core budget of an in-process engine: how many intra-op threads each instance of a model
//! runs a batch on, so that instances x threads never exceed the host's cores.
//!
//! tract runs a batch on its instance thread alone, so a tract model uses `instances` cores.
//! onnxruntime can spread one batch over several threads: by default each instance gets an
//! equal share of the cores (`cores / instances`, at least 1). A configured
//! `onnxruntime.intra_op_threads` is kept when it fits and lowered to the share, with a warning,
//! when it would not.

/// Cores this process may run on.
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Intra-op threads per instance, and why it differs from what was asked, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadPlan {
    /// Threads one batch runs on.
    pub threads: usize,
    /// Why the configured value was not used.
    pub lowered: Option<String>,
}

/// The threads per instance for a model of `instances` instances on a host of `cores` cores;
/// `requested` is the config's `onnxruntime.intra_op_threads`.
pub fn intra_op_threads(requested: Option<usize>, instances: usize, cores: usize) -> ThreadPlan {
    let instances = instances.max(1);
    let share = (cores.max(1) / instances).max(1);
    match requested {
        None => ThreadPlan { threads: share, lowered: None },
        Some(asked) if asked.saturating_mul(instances) <= cores.max(share * instances) => {
            ThreadPlan { threads: asked.max(1), lowered: None }
        }
        Some(asked) => ThreadPlan {
            threads: share,
            lowered: Some(format!(
                "onnxruntime.intra_op_threads = {asked} with instances = {instances} would run {} \
                 threads on {cores} cores; each instance gets {share}",
                asked.saturating_mul(instances)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_times_threads_never_exceed_the_cores() {
        for cores in [1, 2, 16] {
            for instances in 1..=8 {
                for requested in [None, Some(1), Some(2), Some(4), Some(64)] {
                    let plan = intra_op_threads(requested, instances, cores);
                    assert!(plan.threads >= 1);
                    assert!(
                        plan.threads * instances <= cores.max(instances),
                        "{requested:?} x {instances} on {cores}: {plan:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_default_shares_the_cores_and_a_fitting_request_is_kept() {
        assert_eq!(intra_op_threads(None, 1, 2).threads, 2);
        assert_eq!(intra_op_threads(None, 2, 2).threads, 1);
        assert_eq!(intra_op_threads(None, 4, 16).threads, 4);
        assert_eq!(intra_op_threads(Some(3), 4, 16), ThreadPlan { threads: 3, lowered: None });
        let lowered = intra_op_threads(Some(8), 4, 16);
        assert_eq!(lowered.threads, 4);
        let why = lowered.lowered.expect("a reason");
        assert!(why.contains("intra_op_threads = 8") && why.contains("16 cores"), "{why}");
    }
}
