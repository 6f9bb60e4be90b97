//! Marathon's SSE event stream, parsed: a tiny incremental `text/event-stream` decoder and the
//! mapping from an event to what must be re-read (one app, or everything). Pure.

use serde_json::Value;

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Incremental decoder: feed bytes as they arrive, take whole events out.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline: a long line arriving in many small
    /// chunks is scanned once, not once per chunk.
    scanned: usize,
    event: String,
    data: String,
}

/// Refuse to buffer a line longer than this (a broken or hostile stream).
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
#[error("SSE line longer than {MAX_LINE} bytes")]
pub struct LineTooLong;

impl SseDecoder {
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), LineTooLong> {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(pos) = self.buf[from..].iter().position(|b| *b == b'\n') {
            let end = from + pos;
            let mut line = &self.buf[start..end];
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line, out);
            start = end + 1;
            from = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_LINE {
            self.buf.clear();
            self.scanned = 0;
            return Err(LineTooLong);
        }
        Ok(())
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if !self.data.is_empty() || !self.event.is_empty() {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
    }
}

/// The event types that can change a VIP table; the stream is filtered to these.
pub const RELEVANT_EVENTS: &[&str] = COUNTED_EVENTS.split_at(15).0;

/// The event types counted by name in `marathon_events_total{type}` (any other is `other`):
/// the [`RELEVANT_EVENTS`] first, then the stream's own and `unnamed`.
pub const COUNTED_EVENTS: &[&str] = &[
    "status_update_event",
    "instance_changed_event",
    "health_status_changed_event",
    "instance_health_changed_event",
    "app_terminated_event",
    "api_post_event",
    "deployment_success",
    "deployment_failed",
    "deployment_step_success",
    "unhealthy_task_kill_event",
    "unhealthy_instance_kill_event",
    "group_change_success",
    "pod_created_event",
    "pod_updated_event",
    "pod_deleted_event",
    "deployment_info",
    "event_stream_attached",
    "event_stream_detached",
    "unnamed",
];

/// What an event asks the controller to re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Nothing: not an event that changes VIPs.
    None,
    /// These apps.
    Apps(Vec<String>),
    /// Everything (the event names no app we can act on alone).
    All,
}

/// Map one SSE event to an invalidation. Malformed data asks for a full re-read rather than
/// being ignored: missing a change is worse than one extra snapshot.
pub fn invalidation(ev: &SseEvent) -> Invalidation {
    let v: Value = match serde_json::from_str(&ev.data) {
        Ok(v) => v,
        Err(_) => return Invalidation::All,
    };
    let kind = if ev.event.is_empty() {
        v.get("eventType").and_then(Value::as_str).unwrap_or("")
    } else {
        ev.event.as_str()
    };
    if !RELEVANT_EVENTS.contains(&kind) {
        return Invalidation::None;
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let app = match kind {
        "api_post_event" => v
            .pointer("/appDefinition/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| s("uri").and_then(|u| u.strip_prefix("/v2/apps").map(str::to_string))),
        "instance_changed_event" | "instance_health_changed_event" => s("runSpecId"),
        // Pods share the apps' id space: the sync loop reads an id as an app, else as a pod.
        k if k.starts_with("pod_") => {
            s("uri").and_then(|u| u.strip_prefix("/v2/pods").map(str::to_string))
        }
        "group_change_success" => return Invalidation::All,
        k if k.starts_with("deployment_") => {
            let apps: Vec<String> = v
                .pointer("/plan/steps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|step| {
                    // Older plans: {"action","app"}; newer: {"actions":[{"action","app"}]}.
                    let direct = step.get("app").and_then(Value::as_str).map(str::to_string);
                    let nested: Vec<String> = step
                        .get("actions")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.get("app").and_then(Value::as_str).map(str::to_string))
                        .collect();
                    direct.into_iter().chain(nested)
                })
                .collect();
            return if apps.is_empty() {
                Invalidation::All
            } else {
                Invalidation::Apps(apps)
            };
        }
        _ => s("appId"),
    };
    match app {
        Some(a) if a.starts_with('/') => Invalidation::Apps(vec![a]),
        Some(a) if !a.is_empty() => Invalidation::Apps(vec![format!("/{a}")]),
        _ => Invalidation::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_filtered_to_the_counted_events_up_to_pod_deleted() {
        assert_eq!(RELEVANT_EVENTS.len(), 15);
        assert_eq!(RELEVANT_EVENTS.last(), Some(&"pod_deleted_event"));
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/marathon");

    #[test]
    fn decodes_the_real_stream_in_any_chunking() {
        let raw =
            std::fs::read(format!("{FIXTURES}/marathon-docs-examples-events.sse.txt")).unwrap();
        for chunk in [1, 7, 64, raw.len()] {
            let mut d = SseDecoder::default();
            let mut out = Vec::new();
            for c in raw.chunks(chunk) {
                d.feed(c, &mut out).unwrap();
            }
            assert_eq!(out.len(), 3, "chunk {chunk}");
            assert_eq!(out[1].event, "status_update_event");
            assert_eq!(invalidation(&out[0]), Invalidation::None);
            assert_eq!(
                invalidation(&out[1]),
                Invalidation::Apps(vec!["/foo".into()])
            );
            assert_eq!(
                invalidation(&out[2]),
                Invalidation::Apps(vec!["/test-app".into()])
            );
        }
    }

    #[test]
    fn every_documented_event_maps() {
        let raw = std::fs::read_to_string(format!(
            "{FIXTURES}/marathon-docs-event-bus-examples.json-blocks.txt"
        ))
        .unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for v in serde_json::Deserializer::from_str(&raw).into_iter::<Value>() {
            let v = v.unwrap();
            let kind = v["eventType"].as_str().unwrap().to_string();
            let ev = SseEvent {
                event: kind.clone(),
                data: v.to_string(),
            };
            seen.insert(kind, invalidation(&ev));
        }
        let app = |a: &str| Invalidation::Apps(vec![a.to_string()]);
        assert_eq!(seen["api_post_event"], app("/my-app"));
        assert_eq!(seen["status_update_event"], app("/my-app"));
        assert_eq!(seen["app_terminated_event"], app("/my-app"));
        assert_eq!(seen["instance_changed_event"], app("/app-id"));
        assert_eq!(seen["instance_health_changed_event"], app("/app-id"));
        assert_eq!(seen["health_status_changed_event"], app("/my-app"));
        assert_eq!(seen["unhealthy_task_kill_event"], app("/my-app"));
        assert_eq!(seen["deployment_step_success"], app("/my-app"));
        assert_eq!(seen["deployment_success"], Invalidation::All);
        assert_eq!(seen["group_change_success"], Invalidation::All);
        assert_eq!(seen["framework_message_event"], Invalidation::None);
        assert_eq!(seen["pod_created_event"], app("/my-pod"));
        assert_eq!(seen["pod_updated_event"], app("/my-pod"));
        assert_eq!(seen["pod_deleted_event"], app("/my-pod"));
        assert_eq!(seen["failed_health_check_event"], Invalidation::None);
        assert_eq!(seen.len(), 27);
    }

    fn decode_in(bytes: &[u8], cuts: &[usize]) -> Vec<SseEvent> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        let mut at = 0;
        for c in cuts
            .iter()
            .map(|c| c % (bytes.len() + 1))
            .chain([bytes.len()])
        {
            if c >= at {
                d.feed(&bytes[at..c], &mut out).unwrap();
                at = c;
            }
        }
        out
    }

    proptest::proptest! {
        /// Any bytes, cut anywhere: no panic, and the same events as in one piece (and every
        /// event maps to an invalidation without panicking).
        #[test]
        fn any_bytes_any_chunking(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"\n\r: eventdat{}\"xy".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..400,
            ),
            mut cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            cuts.sort_unstable();
            let whole = decode_in(&bytes, &[]);
            proptest::prop_assert_eq!(&decode_in(&bytes, &cuts), &whole);
            for ev in &whole {
                let _ = invalidation(ev);
            }
        }
    }

    #[test]
    fn garbage_is_safe() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.feed(
            b"event: status_update_event\ndata: {not json\n\n: keepalive\n\ndata\n\n\xff\xfe\n\n",
            &mut out,
        )
        .unwrap();
        // Only the first block carries anything; it asks for a full re-read.
        assert_eq!(out.len(), 1);
        assert_eq!(invalidation(&out[0]), Invalidation::All);
        assert!(d.feed(&vec![b'x'; MAX_LINE + 1], &mut out).is_err());
    }
}
