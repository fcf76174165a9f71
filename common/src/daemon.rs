//! What every Flotilla binary does the same way: logging set-up, stopping on SIGTERM or
//! Ctrl-C, printing an error with all its causes, and spawning tasks whose panics are logged
//! at once ([`spawn_watched`]).

use tokio_util::sync::CancellationToken;

/// Installs the global tracing subscriber writing to stderr with `filter` (EnvFilter syntax;
/// `fallback` if it does not parse). Colours only on a terminal. A second call is a no-op.
pub fn init_logging(filter: &str, fallback: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(fallback));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Waits for SIGTERM or SIGINT, then cancels `shutdown`; a second SIGTERM or SIGINT while the
/// clean stop runs ends the process at once with [`EXIT_FORCED`] (logged at ERROR).
pub async fn stop_on_signal(shutdown: CancellationToken) {
    let mut signals = Signals::new();
    signals.next().await;
    tracing::info!("Signal received; stopping (a second signal stops at once).");
    shutdown.cancel();
    signals.next().await;
    tracing::error!(
        code = EXIT_FORCED,
        "Second signal received; exiting now without finishing the clean stop."
    );
    std::process::exit(i32::from(EXIT_FORCED));
}

/// SIGTERM and SIGINT as one stream. The handlers are installed once, so a signal that
/// arrives between two waits is kept, not lost to the default action.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn next(&mut self) {
        async fn recv(s: Option<&mut tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = recv(self.term.as_mut()) => {}
            () = recv(self.int.as_mut()) => {}
        }
    }
}

/// Exit status when a second SIGTERM/SIGINT cut the clean stop short (128 + SIGINT, as shells
/// report an interrupted command).
pub const EXIT_FORCED: u8 = 130;

/// Exit status for a bad configuration (sysexits' EX_USAGE); systemd units do not restart on it.
pub const EXIT_CONFIG: u8 = 64;

/// Turns a binary's result into its exit status: 0, [`EXIT_CONFIG`] when the error is a
/// [`crate::config::ConfigError`], 1 otherwise; errors are printed with their whole chain.
pub fn exit_status(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<crate::config::ConfigError>().is_some() {
                std::process::ExitCode::from(EXIT_CONFIG)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// `e` and its sources joined with ": ", for one-line logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Spawns `fut` as a task whose panic is logged at ERROR (naming `task`) the moment it happens,
/// instead of surfacing only when someone awaits the handle; the handle then reports the panic
/// as before. Aborting the returned handle does not stop the task: use it for tasks that run
/// until a cancellation token says stop.
pub fn spawn_watched<F>(task: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let inner = tokio::spawn(fut);
    tokio::spawn(async move {
        match inner.await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(task, error = %e, "Task ended abnormally.");
                match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Cancelled: only when the runtime itself is going away.
                    Err(e) => std::panic::resume_unwind(Box::new(e.to_string())),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[tokio::test]
    async fn a_watched_task_still_reports_its_panic() {
        let handle = spawn_watched("test", async { panic!("boom") });
        assert!(handle.await.unwrap_err().is_panic());
        assert_eq!(spawn_watched("test", async { 7 }).await.unwrap(), 7);
    }
}
