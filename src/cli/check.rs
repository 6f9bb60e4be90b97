//! `l4lb check`: build the VIP table an apps file (or a Mesos `GET_STATE` answer) yields, as
//! the sources would, print it as `/v1/vips` JSON and every rejected app and label on stderr;
//! exit 1 if anything was rejected.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{CheckConfig, CheckFile, ConfigError};
use crate::exit::AppError;
use crate::model::wire::table_to_json;
use crate::source::{self, state::TableState};

pub fn check(args: CheckConfig) -> Result<ExitCode, AppError> {
    let (path, what, mesos) = match &args.file {
        CheckFile::Apps(p) => (p, "apps file", false),
        CheckFile::MesosState(p) => (p, "Mesos state file", true),
    };
    let body = std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.clone(),
        source,
    })?;
    let hosts = source::HostCache::default();
    let (contribs, bad_apps) = if mesos {
        source::mesos::cluster::contributions_of_state(&body, &mut |h| hosts.resolve(h))
            .with_context(|| path.display().to_string())?
    } else {
        source::marathon::apps::contributions(&body, &hosts)
            .with_context(|| path.display().to_string())?
    };
    let mut state = TableState::new(args.build, 1);
    state.replace_all(contribs);
    let table = state.rebuild(0).table.unwrap_or_default();
    let json = serde_json::to_string_pretty(&table_to_json(&table)).context("encoding")?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let mut err = std::io::stderr().lock();
    let mut rejected = 0;
    for b in &bad_apps {
        let _ = writeln!(err, "rejected app: {b}");
        rejected += 1;
    }
    for r in state.rejections() {
        // The words of /v1/label-errors and the status page.
        let _ = writeln!(err, "rejected label: {}", r.to_model(0));
        rejected += 1;
    }
    Ok(if rejected > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
