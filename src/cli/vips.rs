//! `l4lb vips`: fetch `/v1/vips` from a running controller, agent or `l4lb run` and print it
//! as a table for people, like `ipvsadm -Ln` ([`render_vips`]), or as the raw JSON.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::VipsConfig;
use crate::exit::AppError;
use crate::model::wire::{BackendJson, VipJson};

pub async fn vips(args: VipsConfig) -> Result<ExitCode, AppError> {
    let url = args.api.join("v1/vips").context("bad --api URL")?;
    let mut rb = crate::tls::client_builder()
        .build()
        .context("HTTP client")?
        .get(url.clone())
        .timeout(Duration::from_secs(10));
    if let Some(t) = &args.token {
        rb = rb.bearer_auth(t.expose());
    }
    let resp = rb
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let version = resp
        .headers()
        .get(crate::model::wire::INDEX_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let body = resp
        .bytes()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        return Err(anyhow::anyhow!("{url} answered {status}").into());
    }
    let vips: Vec<VipJson> =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a VIP list"))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(&body));
    } else {
        let _ = write!(out, "{}", render_vips(&vips, &version));
    }
    Ok(ExitCode::SUCCESS)
}

/// The columns of a VIP line and of its backends' lines, left to right.
const HEADER: [&str; 7] = [
    "PROTO",
    "VIP / BACKEND",
    "ADDRESS",
    "STATE",
    "CONNS",
    "BYTES",
    "KERNEL",
];

/// The `l4lb vips` table, like `ipvsadm -Ln`: a line per VIP (with the data plane that
/// serves it, on an agent), then a line per backend.
pub fn render_vips(vips: &[VipJson], version: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "VIP table version {version}: {} VIPs", vips.len());
    let [proto, vip, addr, state, conns, bytes, kernel] = HEADER;
    let _ = writeln!(
        s,
        "{proto:<5} {vip:<46} {addr:<24} {state:<10} {conns:>7} {bytes:>10} {kernel:>8}  APP/TASK"
    );
    for v in vips {
        let _ = writeln!(s, "{}", vip_line(v));
        for b in &v.backend {
            let _ = writeln!(s, "{}", backend_line(b));
        }
    }
    s
}

fn vip_line(v: &VipJson) -> String {
    let addr = SocketAddr::new(v.ip, v.port).to_string();
    let plane = v.data_plane.map_or("", |p| p.as_str());
    // Why the kernel path does not serve it, when it does not.
    let why = v
        .data_plane_reason
        .as_deref()
        .map_or_else(String::new, |r| format!(" ({r})"));
    format!("{:<5} {:<46} {:<24} {plane}{why}", v.protocol, v.vip, addr)
}

fn backend_line(b: &BackendJson) -> String {
    let addr = SocketAddr::new(b.ip, b.port).to_string();
    let state = match b.ejected {
        Some(true) => format!("{}*", b.state.as_str()),
        _ => b.state.as_str().to_string(),
    };
    let count = |c: Option<u64>| c.map_or_else(|| "-".to_string(), |c| c.to_string());
    let bytes = b.bytes.map_or_else(|| "-".to_string(), human_bytes);
    // Connections the kernel path translated to this backend (it sees no bytes).
    let kernel = count(b.kernel_connections);
    format!(
        "{:<5} {:<46} {:<24} {:<10} {:>7} {:>10} {:>8}  {} {}",
        "",
        "  ->",
        addr,
        state,
        count(b.connections),
        bytes,
        kernel,
        b.app,
        b.task
    )
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_table_shows_the_data_plane_and_kernel_counts() {
        let vips: Vec<VipJson> = serde_json::from_str(
            r#"[{"vip":"web.marathon.l4lb.thisdcos.directory:80","protocol":"tcp",
                 "name":"web.marathon.l4lb.thisdcos.directory","ip":"198.18.128.9","port":80,
                 "data_plane":"bpf",
                 "backend":[{"ip":"198.18.0.2","port":31000,"state":"active","app":"/web",
                             "task":"web.1","connections":0,"bytes":0,"kernel_connections":7}]}]"#,
        )
        .unwrap();
        let out = render_vips(&vips, "3");
        let vip_line = out.lines().nth(2).unwrap();
        assert!(vip_line.ends_with("bpf"), "{out}");
        let backend_line = out.lines().nth(3).unwrap();
        assert!(backend_line.contains(" 7  /web web.1"), "{out}");
    }

    #[test]
    fn vips_table_says_why_the_proxy_serves_a_vip() {
        let vips: Vec<VipJson> = serde_json::from_str(
            r#"[{"vip":"198.18.5.5:80","protocol":"tcp","ip":"198.18.5.5","port":80,
                 "data_plane":"proxy","data_plane_reason":"all backends ejected","backend":[]}]"#,
        )
        .unwrap();
        let out = render_vips(&vips, "3");
        let vip_line = out.lines().nth(2).unwrap();
        assert!(vip_line.ends_with("proxy (all backends ejected)"), "{out}");
    }

    #[test]
    fn a_controllers_table_shows_no_plane_and_no_counts() {
        let vips: Vec<VipJson> = serde_json::from_str(
            r#"[{"vip":"198.18.128.9:53","protocol":"udp","name":null,"ip":"198.18.128.9",
                 "port":53,"backend":[{"ip":"198.18.0.2","port":53,"state":"draining"}]}]"#,
        )
        .unwrap();
        let out = render_vips(&vips, "9");
        assert!(out.starts_with("VIP table version 9: 1 VIPs\n"), "{out}");
        let vip_line = out.lines().nth(2).unwrap();
        assert!(
            vip_line.trim_end().ends_with("198.18.128.9:53"),
            "{vip_line:?}"
        );
        let backend_line = out.lines().nth(3).unwrap();
        let words: Vec<&str> = backend_line.split_whitespace().collect();
        // Connections, bytes and kernel connections unknown on a controller.
        assert_eq!(
            words,
            ["->", "198.18.0.2:53", "draining", "-", "-", "-"],
            "{out}"
        );
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
    }
}
