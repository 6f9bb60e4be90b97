//! The controller's memory between Marathon reads: each app's contribution, the sticky
//! allocator, and the last published table. Pure apart from the clock value passed in: a
//! snapshot replaces every app, an event replaces one, and [`TableState::rebuild`] publishes a
//! new version only when the VIPs actually changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};

use super::build::{AppVips, Rejection, assemble};
use crate::alloc::Allocator;
use crate::labels::IpPolicy;
use crate::model::VipTable;

/// Settings that shape the table.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    pub framework: String,
    pub policy: IpPolicy,
    pub vip_cidr: Ipv4Net,
    pub vip_cidr6: Ipv6Net,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            framework: "marathon".into(),
            policy: IpPolicy::default(),
            vip_cidr: Ipv4Net::new(std::net::Ipv4Addr::new(11, 0, 0, 0), 8).unwrap_or_default(),
            vip_cidr6: Ipv6Net::new(std::net::Ipv6Addr::new(0xfd01, 0xc, 0, 0, 0, 0, 0, 0), 64)
                .unwrap_or_default(),
        }
    }
}

/// What a rebuild produced.
#[derive(Debug)]
pub struct Rebuilt {
    /// The new table, when its VIPs differ from the last published one.
    pub table: Option<Arc<VipTable>>,
    /// Rejections not seen in the previous build (to log and count once).
    pub new_rejections: Vec<Rejection>,
}

#[derive(Debug)]
pub struct TableState {
    cfg: BuildConfig,
    alloc: Allocator,
    apps: BTreeMap<String, AppVips>,
    current: Arc<VipTable>,
    rejections: BTreeSet<Rejection>,
    next_version: u64,
}

impl TableState {
    /// `first_version` should grow across restarts (the caller passes the start time in ms),
    /// so agents watching with an old index never wait on a restarted controller.
    pub fn new(cfg: BuildConfig, first_version: u64) -> Self {
        let alloc = Allocator::new(cfg.vip_cidr, cfg.vip_cidr6);
        TableState {
            cfg,
            alloc,
            apps: BTreeMap::new(),
            current: Arc::new(VipTable::default()),
            rejections: BTreeSet::new(),
            next_version: first_version.max(1),
        }
    }

    /// Replace every app (a full snapshot).
    pub fn replace_all(&mut self, apps: impl IntoIterator<Item = AppVips>) {
        self.apps = apps.into_iter().map(|a| (a.app.clone(), a)).collect();
    }

    /// Replace or add one app.
    pub fn upsert(&mut self, app: AppVips) {
        self.apps.insert(app.app.clone(), app);
    }

    /// Forget one app (deleted in Marathon).
    pub fn remove(&mut self, app_id: &str) {
        self.apps.remove(app_id);
    }

    pub fn current(&self) -> &Arc<VipTable> {
        &self.current
    }

    /// Every label currently rejected.
    pub fn rejections(&self) -> impl Iterator<Item = &Rejection> {
        self.rejections.iter()
    }

    /// Merge all apps into a table; publish it as a new version if it differs.
    pub fn rebuild(&mut self, changed_at_ms: u64) -> Rebuilt {
        let built = assemble(
            self.apps.values(),
            &self.cfg.framework,
            &self.cfg.policy,
            &mut self.alloc,
        );
        let now: BTreeSet<Rejection> = built.rejections.into_iter().collect();
        let new_rejections = now.difference(&self.rejections).cloned().collect();
        self.rejections = now;
        let candidate = VipTable::new(0, built.vips);
        let table = if self.current.version != 0 && candidate.same_content(&self.current) {
            None
        } else {
            let mut t = candidate.share_with(&self.current);
            t.version = self.next_version;
            t.changed_at_ms = changed_at_ms;
            self.next_version += 1;
            let t = Arc::new(t);
            self.current = Arc::clone(&t);
            Some(t)
        };
        Rebuilt {
            table,
            new_rejections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::build::app_vips;
    use crate::source::marathon::types::parse_apps;

    fn contribs(json: &str) -> Vec<AppVips> {
        let (apps, _) = parse_apps(json.as_bytes()).unwrap();
        apps.iter().map(|a| app_vips(a, &mut |_| None)).collect()
    }

    const ONE: &str = r#"{"apps":[{"id":"/web","portDefinitions":[{"port":0,"labels":{"VIP_0":"/web:80","VIP_1":"bad"}}],
        "tasks":[{"id":"w1","host":"198.18.0.1","ports":[31001],"state":"TASK_RUNNING"}]}]}"#;

    #[test]
    fn versions_bump_only_on_change_and_rejections_are_new_once() {
        let mut s = TableState::new(BuildConfig::default(), 100);
        s.replace_all(contribs(ONE));
        let r = s.rebuild(5);
        let t = r.table.unwrap();
        assert_eq!((t.version, t.changed_at_ms, t.vips.len()), (100, 5, 1));
        assert_eq!(r.new_rejections.len(), 1);
        // Same input: no new version, no new rejection.
        s.replace_all(contribs(ONE));
        let r = s.rebuild(6);
        assert!(r.table.is_none() && r.new_rejections.is_empty());
        assert_eq!(s.rejections().count(), 1);
        // App removed: empty table, next version.
        s.remove("/web");
        let t = s.rebuild(7).table.unwrap();
        assert_eq!((t.version, t.vips.len()), (101, 0));
    }

    #[test]
    fn first_build_publishes_even_when_empty() {
        let mut s = TableState::new(BuildConfig::default(), 1);
        let t = s.rebuild(0).table.unwrap();
        assert_eq!(t.version, 1);
        assert!(t.vips.is_empty());
    }
}
