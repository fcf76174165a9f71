//! Human-readable report of what the collectors see.
