//! Control: deciding what the fleet should run, and (later) carrying it out.
//!
//! | module | owns |
//! |---|---|
//! | [`policy`] | the scaling policy file (`[[policy]]` TOML), its validation, [`policy::PolicySet`] |
//! | [`engine`] | the pure scaling decision engine: [`engine::Scaler`] -> [`engine::Decision`] |
//! | [`simulate`] | replay of a demand trace through the engine and the forecaster (`flotilla simulate`) |

pub mod engine;
pub mod policy;
pub mod simulate;
