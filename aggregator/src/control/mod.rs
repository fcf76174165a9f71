//! The control loop: what the aggregator decides and how it reaches the agents.
//!
//! | module | owns |
//! |---|---|
//! | [`policy`] | the scaling policy file (`[[policy]]` TOML), its validation, [`policy::PolicySet`] |
//! | [`engine`] | the pure scaling decision engine: [`engine::Scaler`] -> [`engine::Decision`] |
//! | [`simulate`] | replay of a demand trace through the engine and the forecaster (`flotilla simulate`) |
//! | [`autoscaler`] | evaluating the policies on live telemetry and turning decisions into directives |
//! | [`budget_cap`] | how far budgets let a policy grow, and the alerts when they hold it back |
//! | [`placement`] | sharing a host's capacity by priority, and placing what it cannot hold elsewhere |
//! | [`fleet`] | the fleet-size actuator (a command or webhook) for adding and removing hosts |
//! | [`optimize`] | budget auto-optimize: the plans safe to automate, as directives |
//! | [`searches`] | optimization searches on the agents, followed to their reports and kept |
//! | [`store`] | desired state, directive outbox, decisions, scaler state: typed, transactional |
//! | [`delivery`] | sending each connected host its unanswered directives, in order, and recording answers |
//! | [`routes`] | the admin API's directive, decision and desired-state routes |
//!
//! ```text
//! telemetry --autoscaler (policy, engine)--+
//! operator (API/CLI) ----------------------+--one transaction--> decision + directives + desired state
//!        --> outbox --delivery (per connected host, oldest first)==QUIC==> agent --> answer
//! ```

pub mod autoscaler;
pub mod budget_cap;
pub mod delivery;
pub mod engine;
pub mod fleet;
pub mod optimize;
pub mod placement;
pub mod policy;
pub mod routes;
pub mod searches;
pub mod simulate;
pub mod store;

use common::config::aggregator::ControlConfig;

/// Loads `control.policy_file` (an empty set when none is configured).
pub fn load_policies(config: &ControlConfig) -> Result<policy::PolicySet, policy::PolicyError> {
    match &config.policy_file {
        Some(path) => policy::PolicySet::load(path),
        None => policy::PolicySet::parse(""),
    }
}
