//! HTTP client for Marathon's REST API with fail-over between several masters and optional
//! basic or token auth. Credentials are held in a type whose `Debug` never shows them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reqwest::{Method, StatusCode, header};

use super::events::RELEVANT_EVENTS;
use crate::source::http::{Error, SourceClient, Transport};

/// A client over one or more Marathon masters. Requests go to the master that last answered;
/// on failure the next ones are tried in turn. `Debug` shows no secret.
#[derive(Clone, Debug)]
pub struct Client {
    http: Transport,
    preferred: Arc<AtomicUsize>,
}

impl SourceClient for Client {
    const FLAG: &'static str = "--marathon";
    const FOLLOW_REDIRECTS: bool = true;

    fn over(http: Transport) -> Self {
        Client {
            http,
            preferred: Arc::default(),
        }
    }

    fn transport_mut(&mut self) -> &mut Transport {
        &mut self.http
    }
}

impl Client {
    /// Send `path_and_query` to each master in turn, starting with the preferred one; return the
    /// first response that is a success or a 404 (`Ok(None)` for 404).
    async fn get(
        &self,
        path_and_query: &str,
        stream: bool,
    ) -> Result<Option<reqwest::Response>, Error> {
        let masters = self.http.masters();
        if masters.is_empty() {
            return Err(Error::NoMasters("Marathon"));
        }
        let n = masters.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let Ok(url) = masters[idx].join(path_and_query) else {
                continue;
            };
            let accept = if stream {
                "text/event-stream"
            } else {
                "application/json"
            };
            let rb = self
                .http
                .request(Method::GET, url.clone(), stream)
                .header(header::ACCEPT, accept);
            match self.http.send(&url, rb).await {
                Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r.status().is_success().then_some(r));
                }
                Ok(r) => last_err = Some(Error::status(&url, r.status())),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(Error::NoMasters("Marathon")))
    }

    async fn body(&self, path_and_query: &str) -> Result<Option<Vec<u8>>, Error> {
        match self.get(path_and_query, false).await? {
            Some(r) => self.http.body(r).await.map(Some),
            None => Ok(None),
        }
    }

    /// `GET /v2/apps?embed=apps.tasks`: every app with its tasks.
    pub async fn apps(&self) -> Result<Vec<u8>, Error> {
        self.body("v2/apps?embed=apps.tasks")
            .await?
            .ok_or_else(|| Error::Status {
                url: "/v2/apps".into(),
                status: StatusCode::NOT_FOUND,
            })
    }

    /// `GET /v2/apps/{id}?embed=app.tasks`; `None` when the app does not exist.
    pub async fn app(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        let id = id.trim_start_matches('/');
        self.body(&format!("v2/apps/{id}?embed=app.tasks")).await
    }

    /// `GET /v2/pods/::status`: every pod with its instances; `None` when this Marathon has
    /// no pods API (404).
    pub async fn pods(&self) -> Result<Option<Vec<u8>>, Error> {
        self.body("v2/pods/::status").await
    }

    /// `GET /v2/pods/{id}::status`; `None` when the pod does not exist.
    pub async fn pod(&self, id: &str) -> Result<Option<Vec<u8>>, Error> {
        let id = id.trim_start_matches('/');
        self.body(&format!("v2/pods/{id}::status")).await
    }

    /// Open `GET /v2/events` filtered to the events that can change VIPs.
    pub async fn events(&self) -> Result<reqwest::Response, Error> {
        let q: Vec<String> = RELEVANT_EVENTS
            .iter()
            .map(|e| format!("event_type={e}"))
            .collect();
        self.get(&format!("v2/events?{}", q.join("&")), true)
            .await?
            .ok_or_else(|| Error::Status {
                url: "/v2/events".into(),
                status: StatusCode::NOT_FOUND,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use reqwest::Url;

    use super::*;
    use crate::model::Secret;
    use crate::source::http::Auth;

    #[test]
    fn secrets_never_in_debug() {
        let a = Auth::Basic {
            user: "u".into(),
            password: Secret::from("hunter2"),
        };
        let u: Url = "http://user:pw@m1:8080/v2/apps?embed=apps.tasks"
            .parse()
            .unwrap();
        crate::tls::init();
        let c = Client::new(vec![u], a, Duration::from_secs(1)).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("m1:8080"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw@"),
            "{shown}"
        );
    }
}
