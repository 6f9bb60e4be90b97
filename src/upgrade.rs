//! Upgrading an agent in place: the wiring of `--take-over` ([`crate::agent::handoff`]) and
//! of systemd's reload ([`crate::sd_notify`]).
//!
//! Every agent listens for a successor ([`serve_successors`]); on SIGUSR2 it starts one itself:
//! the binary at the path it was started from (after a package upgrade, the new one) with
//! its own arguments plus `--take-over` ([`reexec_on_usr2`]). The successor takes the
//! sockets ([`inherit`]), serves the table the predecessor saved for it, and once it has
//! applied a table tells the predecessor and systemd ([`announce`]). Wiring only, like
//! `app`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::agent::handoff::{self, HandedOver, Listener, Sockets, Successor};
use crate::agent::saved::SavedTable;
use crate::sd_notify::{Notifier, State};
use crate::source::TableRx;

/// The flag a successor is started with.
pub const FLAG: &str = "--take-over";

/// The binary to start a successor from: this process's own path, which after a package
/// upgrade names the new binary (the kernel shows the replaced one as `<path> (deleted)`).
pub fn own_exe() -> std::io::Result<PathBuf> {
    Ok(live_path(std::env::current_exe()?))
}

fn live_path(exe: PathBuf) -> PathBuf {
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(live) => PathBuf::from(live),
        None => exe,
    }
}

/// The hand-over socket of this agent's link.
pub fn socket_path(state_dir: &std::path::Path, link: &str) -> anyhow::Result<PathBuf> {
    handoff::socket_path(state_dir, link)
        .map_err(|e| anyhow::anyhow!("naming the hand-over socket: {e}"))
}

/// With `take_over`, the running agent's sockets (and the handle to tell it this one
/// serves); else an empty book, to be filled with what this agent binds.
pub async fn inherit(
    take_over: bool,
    path: &std::path::Path,
) -> anyhow::Result<(Sockets, Option<Successor>)> {
    if !take_over {
        return Ok((Sockets::default(), None));
    }
    let (sockets, successor) = match handoff::take_over(path).await {
        Ok(got) => got,
        Err(e @ handoff::HandoffError::NoPeer { .. }) => {
            tracing::warn!(error = %e, "--take-over: nothing to take over; starting afresh");
            return Ok((Sockets::default(), None));
        }
        Err(e) => return Err(anyhow::anyhow!("--take-over: {e}")),
    };
    tracing::info!(
        predecessor = successor.predecessor,
        sockets = sockets.unclaimed(),
        "taking over from the running agent"
    );
    Ok((sockets, Some(successor)))
}

/// Once `applied` holds a table (at once when not taking over): close the inherited
/// sockets nothing took, tell the predecessor (if taking over) to stop accepting, and tell
/// systemd this process is the service's main one and ready. False if `stop` came first.
pub async fn announce(
    successor: Option<Successor>,
    sockets: &Sockets,
    mut applied: TableRx,
    notify: Option<&Notifier>,
    stop: &CancellationToken,
) -> bool {
    if successor.is_some() {
        let serving = tokio::select! {
            _ = stop.cancelled() => false,
            r = applied.wait_for(|t| t.version != 0) => r.is_ok(),
        };
        if !serving {
            if let Some(s) = successor {
                s.refuse("the successor stopped before serving".into())
                    .await;
            }
            return false;
        }
    }
    let left = sockets.drop_unclaimed();
    if !left.is_empty() {
        tracing::info!(sockets = ?left, "inherited sockets not served here closed");
    }
    if let Some(s) = successor {
        let pid = s.predecessor;
        match s.ready().await {
            Ok(()) => tracing::info!(
                predecessor = pid,
                "serving; the predecessor stops accepting"
            ),
            Err(e) => tracing::warn!(error = %e, predecessor = pid, "cannot tell the predecessor"),
        }
        if let Some(n) = notify {
            n.tell(&[State::MainPid(std::process::id()), State::Ready]);
        }
    } else if let Some(n) = notify {
        n.tell(&[State::Ready]);
    }
    true
}

/// Offer this agent's sockets to successors at `path` until one is ready: then set
/// `handed`, stop the API and DNS (`serving`) and start the drain (`shutdown`). Before each
/// offer the applied table is saved, so the successor serves it at once.
pub async fn serve_successors(
    path: PathBuf,
    sockets: Sockets,
    saved: Option<SavedTable>,
    applied: TableRx,
    handed: HandedOver,
    shutdown: CancellationToken,
    serving: CancellationToken,
) -> anyhow::Result<()> {
    let listener = match Listener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "no hand-over socket: --take-over cannot replace this agent");
            return Ok(());
        }
    };
    tracing::debug!(path = %path.display(), "listening for a successor");
    let prepare = || {
        let t = applied.borrow().clone();
        if let Some(s) = &saved
            && t.version != 0
            && let Err(e) = s.save(&t)
        {
            tracing::warn!(error = %e, "cannot save the table for the successor");
        }
    };
    let successor = listener.serve(&sockets, prepare, &shutdown).await;
    if let Some(pid) = successor {
        tracing::info!(successor = pid, "handed over; finishing open connections");
        handed.set();
        serving.cancel();
        shutdown.cancel();
    }
    // Stopping: no socket may stay open for a successor that will not come.
    sockets.withdraw_all();
    Ok(())
}

/// The arguments of a successor: this process's own, `--take-over` once.
pub fn successor_args(own: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = own
        .into_iter()
        .filter(|a| {
            let s = a.to_string_lossy();
            s != FLAG && !s.starts_with("--take-over=")
        })
        .collect();
    args.push(FLAG.into());
    args
}

/// On each SIGUSR2 until `stop`: tell systemd a reload began and start a successor (`exe`
/// with `args`). If it exits before taking over, this agent serves on and tells systemd
/// the reload is over.
pub async fn reexec_on_usr2(
    exe: PathBuf,
    args: Vec<OsString>,
    notify: Option<Arc<Notifier>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let tell = |states: &[State]| {
        if let Some(n) = &notify {
            n.tell(states);
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = usr2.recv() => {}
        }
        tell(&[State::Reloading]);
        tracing::info!(exe = %exe.display(), "SIGUSR2: starting a successor to take over");
        let child = tokio::process::Command::new(&exe).args(&args).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(exe = %exe.display(), error = %e, "cannot start a successor; serving on");
                tell(&[
                    State::Status(format!("take-over failed: {e}")),
                    State::Ready,
                ]);
                continue;
            }
        };
        tokio::select! {
            // Handed over (or stopping): the successor runs on.
            _ = stop.cancelled() => return Ok(()),
            r = child.wait() => {
                let how = match r {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(status = %how, "the successor exited before taking over; serving on");
                tell(&[State::Status(format!("take-over failed: successor {how}")), State::Ready]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_started_from_its_path() {
        for (exe, want) in [
            ("/usr/bin/l4lb (deleted)", "/usr/bin/l4lb"),
            ("/usr/bin/l4lb", "/usr/bin/l4lb"),
            ("/opt/l4 lb/l4lb", "/opt/l4 lb/l4lb"),
        ] {
            assert_eq!(live_path(PathBuf::from(exe)), PathBuf::from(want));
        }
    }

    #[test]
    fn a_successor_gets_the_same_arguments_and_one_take_over() {
        let own = ["agent", "--log-format", "json", "--take-over"].map(OsString::from);
        assert_eq!(
            successor_args(own),
            ["agent", "--log-format", "json", "--take-over"].map(OsString::from)
        );
        let own = ["run", "--apps-file", "/a", "--take-over=true"].map(OsString::from);
        assert_eq!(
            successor_args(own),
            ["run", "--apps-file", "/a", "--take-over"].map(OsString::from)
        );
    }
}
