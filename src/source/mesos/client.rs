//! HTTP client for the Mesos operator API v1 (`POST /api/v1`, JSON): `SUBSCRIBE` (a
//! streaming answer) and `GET_STATE`, over several masters, following the leader. A master
//! that does not lead answers `307 Temporary Redirect` with the leader in `Location`
//! (`//10.0.0.2:5050/api/v1`); the client follows it itself, with the credentials, and asks
//! the leader first from then on. Authentication is Marathon's (basic, or a DC/OS token).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{StatusCode, Url, header};

use crate::source::marathon::client::Auth;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url} redirected without a usable Location")]
    BadRedirect { url: String },
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("no Mesos master URL configured")]
    NoMasters,
    #[error("{url} sent more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
}

impl Error {
    /// Metric label for the error.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Http { source, .. } if source.is_timeout() => "timeout",
            Error::Http { source, .. } if source.is_connect() => "connect",
            Error::Http { .. } => "http",
            Error::Status { status, .. } if status.is_server_error() => "status_5xx",
            Error::Status { .. } => "status",
            Error::BadRedirect { .. } | Error::TooManyRedirects(_) => "redirect",
            Error::NoMasters => "config",
            Error::TooLarge { .. } => "too_large",
        }
    }
}

/// Redirects followed per request (a leader change mid-request may add one).
const MAX_REDIRECTS: usize = 3;

/// Largest `GET_STATE` answer read (as Marathon's `MAX_BODY`).
pub const MAX_BODY: usize = 1 << 30;

#[derive(Clone)]
pub struct Client {
    masters: Vec<Url>,
    http: reqwest::Client,
    stream_http: reqwest::Client,
    auth: Auth,
    /// The leader's API URL once a master named it (or one answered).
    leader: Arc<Mutex<Option<Url>>>,
    max_body: usize,
}

impl Client {
    /// `masters` are base URLs (`http://m1:5050/`); `timeout` bounds each request except the
    /// open stream (whose connect it bounds).
    pub fn new(masters: Vec<Url>, auth: Auth, timeout: Duration) -> Result<Self, reqwest::Error> {
        let base = || {
            crate::tls::client_builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .tcp_keepalive(Duration::from_secs(30))
        };
        Ok(Client {
            masters,
            http: base().timeout(timeout).build()?,
            stream_http: base().build()?,
            auth,
            leader: Arc::default(),
            max_body: MAX_BODY,
        })
    }

    /// Refuse answers (and stream records) longer than `bytes` (default [`MAX_BODY`]).
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The longest answer or record read.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::None => rb,
            Auth::Basic { user, password } => rb.basic_auth(user, Some(password.expose())),
            Auth::Token(t) => rb.header(header::AUTHORIZATION, format!("token={}", t.expose())),
        }
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
        for m in &self.masters {
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
            return Err(Error::NoMasters);
        }
        let mut last = Error::NoMasters;
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
        let http = if stream {
            &self.stream_http
        } else {
            &self.http
        };
        for _ in 0..=MAX_REDIRECTS {
            let rb = http
                .post(url.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .body(format!(r#"{{"type":"{call}"}}"#));
            let resp = self
                .authorize(rb)
                .send()
                .await
                .map_err(|source| Error::Http {
                    url: url.to_string(),
                    source: source.without_url(),
                })?;
            let status = resp.status();
            if status.is_redirection() {
                let next = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| Error::BadRedirect {
                        url: url.to_string(),
                    })?;
                tracing::info!(leader = %next.host_str().unwrap_or("?"), "Mesos master redirects to the leader");
                url = next;
                continue;
            }
            if !status.is_success() {
                return Err(Error::Status {
                    url: url.to_string(),
                    status,
                });
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
        // Without user info or query: errors are logged.
        let url = crate::source::marathon::client::redact(resp.url());
        let limit = self.max_body;
        match crate::source::read_capped(resp, limit).await {
            Ok(body) => Ok(body),
            Err(crate::source::ReadError::TooLarge) => Err(Error::TooLarge { url, limit }),
            Err(crate::source::ReadError::Http(e)) => Err(Error::Http {
                url,
                source: e.without_url(),
            }),
        }
    }
}
