//! The `l4lb` binary: parse and validate the command line into one `Config` (a bad flag
//! exits 64 here, before a runtime, a socket or a link exists), start logging and the
//! runtime, hand over to `l4lb::app`, and map failures to exit codes (64 bad config, 2
//! missing privilege, 1 other).

use std::num::NonZeroUsize;
use std::process::ExitCode;

use clap::Parser;
use l4lb::app;
use l4lb::config::{Cli, LogFormat};

fn main() -> ExitCode {
    l4lb::heap::configure();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let config = match cli.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("l4lb: {e}");
            return ExitCode::from(64);
        }
    };
    init_tracing(config.log_format);
    // A controller's watchers and an agent's proxied connections each hold descriptors.
    let nofile = l4lb::api::limits::raise_nofile();
    tracing::debug!(?nofile, "descriptor limit");
    l4lb::tls::init();
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("l4lb: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(app::main(config)) {
        Ok(code) => code,
        Err(e) => {
            // The chain, each cause once (see `l4lb::exit`).
            eprintln!("l4lb: {e}");
            ExitCode::from(e.code())
        }
    }
}

/// The runtime: `--worker-threads 1` is one thread doing everything (the current-thread
/// scheduler: no work-stealing queues or cross-thread wake-ups per task); otherwise a
/// multi-thread runtime with that many workers, or one per CPU this process may use.
fn runtime(workers: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers.map(NonZeroUsize::get) {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
