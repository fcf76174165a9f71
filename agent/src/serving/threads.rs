//! The core budget of an in-process engine: how many intra-op threads a model's batches run
//! on, so that the host's cores are not oversubscribed, per model or across models.
//!
//! tract runs a batch on its instance thread alone, so a tract model uses `instances` cores.
//! onnxruntime can spread one batch over several threads. By default every onnxruntime model
//! runs in the host's one shared pool of `cores` threads ([`OrtThreads::HostPool`], built with
//! the environment in `ort_library`): models, instances and scale-ups share it, so nothing has
//! to be re-split when they change. A model that sets `onnxruntime.intra_op_threads` (or turns
//! spinning on) gets pools of its own, one per instance ([`OrtThreads::Own`]): the setting is
//! kept when instances x threads fit the cores, and lowered to the share (`cores / instances`,
//! at least 1), with a warning, when they would not, again whenever the instance count changes.

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

/// Where an onnxruntime model's batches find their intra-op threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtThreads {
    /// The host's shared pool (its size is the runtime's `host_pool_threads`).
    HostPool,
    /// Each session (one per instance running a batch) has its own pool of this many threads.
    Own(usize),
}

/// The threads of an onnxruntime model with these options and `instances` instances on a host
/// of `cores` cores, and why a configured value was lowered, if it was.
pub fn ort_threads(
    options: &super::model_config::OrtOptions,
    instances: usize,
    cores: usize,
) -> (OrtThreads, Option<String>) {
    if options.intra_op_threads.is_none() && !options.intra_op_spinning {
        return (OrtThreads::HostPool, None);
    }
    let plan = intra_op_threads(options.intra_op_threads, instances, cores);
    (OrtThreads::Own(plan.threads), plan.lowered)
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
    fn models_share_the_host_pool_unless_they_ask_for_their_own() {
        use super::super::model_config::OrtOptions;
        let default = OrtOptions::default();
        assert_eq!(ort_threads(&default, 4, 2), (OrtThreads::HostPool, None));
        let asked = OrtOptions { intra_op_threads: Some(2), ..OrtOptions::default() };
        assert_eq!(ort_threads(&asked, 1, 2), (OrtThreads::Own(2), None));
        let (scaled, why) = ort_threads(&asked, 2, 2);
        assert_eq!(scaled, OrtThreads::Own(1));
        assert!(why.is_some_and(|w| w.contains("instances = 2")));
        let spinning = OrtOptions { intra_op_spinning: true, ..OrtOptions::default() };
        assert_eq!(ort_threads(&spinning, 2, 16), (OrtThreads::Own(8), None));
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
