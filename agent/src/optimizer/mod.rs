//! The model optimizer: measured variants of a model under an accuracy bound, chosen by a
//! strategy, on the host that serves it.
//!
//! - `calibration`: the inputs a search runs (a `calibration.json` beside the model, or
//!   synthesized with a fixed seed);
//! - `accuracy`: a candidate's distance from the baseline and the bound it must meet;
//! - `measure`: timing one batch size within a share of the CPU;
//! - `footprint`: a candidate's peak memory, measured alone in a child process;
//! - `strategy`: latency, throughput, memory, cost and balanced, and the Pareto set;
//! - `search`: the candidates, the steps and the report;
//! - `start`: a request for a search (HTTP or directive) checked and turned into a spec;
//! - `jobs`: the searches running on this agent, their progress and their reports.

pub mod accuracy;
pub mod calibration;
pub mod footprint;
pub mod jobs;
pub mod measure;
pub mod search;
pub mod start;
pub mod strategy;
