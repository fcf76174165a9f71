//! `flotilla`: the operator CLI over the aggregator's admin API (see `aggregator::cli`).

fn main() -> std::process::ExitCode {
    aggregator::cli::main()
}
