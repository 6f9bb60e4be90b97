//! HTTP client for the Mesos operator API v1 (`POST /api/v1`, JSON): `SUBSCRIBE` (a
//! streaming answer) and `GET_STATE`, over several masters, following the leader. A master
//! that does not lead answers `307 Temporary Redirect` with the leader in `Location`
//! (`//10.0.0.2:5050/api/v1`); the client follows it itself, with the credentials, and asks
//! the leader first from then on. Credentials, errors and the answer cap are the sources'
//! shared ones ([`crate::source::http`]).

use std::sync::{Arc, Mutex};

use reqwest::{Method, Url, header};

use crate::source::http::{self, Error, SourceClient, Transport};

/// Redirects followed per request (a leader change mid-request may add one).
const MAX_REDIRECTS: usize = 3;

#[derive(Clone)]
pub struct Client {
    http: Transport,
    /// The leader's API URL once a master named it (or one answered).
    leader: Arc<Mutex<Option<Url>>>,
}

impl SourceClient for Client {
    const FLAG: &'static str = "--mesos";
    /// Not followed by reqwest: [`Client`] follows a master's redirect to the leader itself.
    const FOLLOW_REDIRECTS: bool = false;

    fn over(http: Transport) -> Self {
        Client {
            http,
            leader: Arc::default(),
        }
    }

    fn transport_mut(&mut self) -> &mut Transport {
        &mut self.http
    }
}

impl Client {
    /// The longest answer or record read.
    pub fn max_body(&self) -> usize {
        self.http.max_body()
    }

    /// The API URLs to try, the known leader first.
    fn candidates(&self) -> Vec<Url> {
        let mut out: Vec<Url> = self
            .leader
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .into_iter()
            .collect();
        for m in self.http.masters() {
            if let Ok(u) = m.join("api/v1")
                && !out.contains(&u)
            {
                out.push(u);
            }
        }
        out
    }

    /// POST `call` to the leader: each master in turn, redirects followed.
    async fn call(&self, call: &'static str, stream: bool) -> Result<reqwest::Response, Error> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(Error::NoMasters("Mesos master"));
        }
        let mut last = Error::NoMasters("Mesos master");
        for url in candidates {
            match self.call_one(url, call, stream).await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::debug!(error = %e, "Mesos master did not answer; trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn call_one(
        &self,
        mut url: Url,
        call: &'static str,
        stream: bool,
    ) -> Result<reqwest::Response, Error> {
        for _ in 0..=MAX_REDIRECTS {
            let rb = self
                .http
                .request(Method::POST, url.clone(), stream)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .body(format!(r#"{{"type":"{call}"}}"#));
            let resp = self.http.send(&url, rb).await?;
            let status = resp.status();
            if status.is_redirection() {
                let next = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| Error::BadRedirect {
                        url: http::redact(&url),
                    })?;
                tracing::info!(leader = %next.host_str().unwrap_or("?"), "Mesos master redirects to the leader");
                url = next;
                continue;
            }
            if !status.is_success() {
                return Err(Error::status(&url, status));
            }
            if let Ok(mut l) = self.leader.lock() {
                *l = Some(url);
            }
            return Ok(resp);
        }
        Err(Error::TooManyRedirects(MAX_REDIRECTS))
    }

    /// Open a `SUBSCRIBE` stream (RecordIO-framed JSON events).
    pub async fn subscribe(&self) -> Result<reqwest::Response, Error> {
        self.call("SUBSCRIBE", true).await
    }

    /// One `GET_STATE` answer.
    pub async fn get_state(&self) -> Result<Vec<u8>, Error> {
        let resp = self.call("GET_STATE", false).await?;
        self.http.body(resp).await
    }
}

impl std::fmt::Debug for Client {
    /// Masters as in logs (no user info, no query); the credentials show as redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}
