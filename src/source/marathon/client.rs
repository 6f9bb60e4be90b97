//! HTTP client for Marathon's REST API with fail-over between several masters and optional
//! basic or token auth. Credentials are held in a type whose `Debug` never shows them.

use std::time::Duration;

use reqwest::{StatusCode, Url, header};

use super::events::RELEVANT_EVENTS;
use crate::model::Secret;
use crate::source::ReadError;

/// How to authenticate to Marathon. `Debug` shows no secret.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    /// `user:password`
    Basic { user: String, password: Secret },
    /// DC/OS ACS token, sent as `Authorization: token=<token>`.
    Token(Secret),
}

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
    #[error("no Marathon URL configured")]
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
            Error::NoMasters => "config",
            Error::TooLarge { .. } => "too_large",
        }
    }
}

/// A client over one or more Marathon masters. Requests go to the master that last answered;
/// on failure the next ones are tried in turn.
#[derive(Clone)]
pub struct Client {
    masters: Vec<Url>,
    http: reqwest::Client,
    stream_http: reqwest::Client,
    auth: Auth,
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max_body: usize,
}

/// Largest answer read. At the sizes of the real payloads in `tests/fixtures/marathon`,
/// 10,000 apps with 3 tasks each are about 23 MB; a larger answer than this (a broken proxy,
/// say) is an error that keeps the last good table, not an out-of-memory kill.
pub const MAX_BODY: usize = 1 << 30;

impl Client {
    pub fn new(masters: Vec<Url>, auth: Auth, timeout: Duration) -> Result<Self, reqwest::Error> {
        for m in with_password(&masters) {
            tracing::warn!(
                marathon = %m,
                "a password in a --marathon URL is visible to every user in ps and \
                 /proc/<pid>/cmdline; use --marathon-auth basic with \
                 --marathon-credentials-file instead"
            );
        }
        let http = crate::tls::client_builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_keepalive(Duration::from_secs(30))
            .build()?;
        // The event stream stays open: no overall timeout, only on connect.
        let stream_http = crate::tls::client_builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_keepalive(Duration::from_secs(30))
            .build()?;
        Ok(Client {
            masters,
            http,
            stream_http,
            auth,
            preferred: Default::default(),
            max_body: MAX_BODY,
        })
    }

    /// Refuse answers longer than `bytes` (default [`MAX_BODY`]).
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::None => rb,
            Auth::Basic { user, password } => rb.basic_auth(user, Some(password.expose())),
            Auth::Token(t) => rb.header(header::AUTHORIZATION, format!("token={}", t.expose())),
        }
    }

    /// Send `path_and_query` to each master in turn, starting with the preferred one; return the
    /// first response that is a success or a 404 (`Ok(None)` for 404).
    async fn get(
        &self,
        path_and_query: &str,
        stream: bool,
    ) -> Result<Option<reqwest::Response>, Error> {
        if self.masters.is_empty() {
            return Err(Error::NoMasters);
        }
        let n = self.masters.len();
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let url = match self.masters[idx].join(path_and_query) {
                Ok(u) => u,
                Err(_) => continue,
            };
            let client = if stream {
                &self.stream_http
            } else {
                &self.http
            };
            let mut rb = client.get(url.clone());
            if stream {
                rb = rb.header(header::ACCEPT, "text/event-stream");
            } else {
                rb = rb.header(header::ACCEPT, "application/json");
            }
            let res = self.authorize(rb).send().await;
            match res {
                Ok(r) if r.status().is_success() => {
                    self.preferred
                        .store(idx, std::sync::atomic::Ordering::Relaxed);
                    return Ok(Some(r));
                }
                Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                    self.preferred
                        .store(idx, std::sync::atomic::Ordering::Relaxed);
                    return Ok(None);
                }
                Ok(r) => {
                    last_err = Some(Error::Status {
                        url: redact(&url),
                        status: r.status(),
                    })
                }
                Err(e) => {
                    last_err = Some(Error::Http {
                        url: redact(&url),
                        source: e.without_url(),
                    })
                }
            }
        }
        Err(last_err.unwrap_or(Error::NoMasters))
    }

    async fn body(&self, path_and_query: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(r) = self.get(path_and_query, false).await? else {
            return Ok(None);
        };
        let url = redact(r.url());
        let limit = self.max_body;
        match crate::source::read_capped(r, limit).await {
            Ok(body) => Ok(Some(body)),
            Err(ReadError::TooLarge) => Err(Error::TooLarge { url, limit }),
            Err(ReadError::Http(e)) => Err(Error::Http {
                url,
                source: e.without_url(),
            }),
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

impl std::fmt::Debug for Client {
    /// Masters as in logs (no user info, no query); the credentials show as redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masters: Vec<String> = self.masters.iter().map(redact).collect();
        f.debug_struct("Client")
            .field("masters", &masters)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The masters (redacted) whose URL carries a password.
fn with_password(masters: &[Url]) -> Vec<String> {
    masters
        .iter()
        .filter(|u| u.password().is_some())
        .map(redact)
        .collect()
}

/// A URL fit for logs: no user info, no query.
pub(crate) fn redact(u: &Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_found_and_never_shown() {
        let urls: Vec<Url> = [
            "http://m1:8080",
            "http://u:hunter2@m2:8080/",
            "http://u@m3/",
        ]
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
        assert_eq!(with_password(&urls), vec!["http://m2:8080/".to_string()]);
    }

    #[test]
    fn secrets_never_in_debug_or_urls() {
        let a = Auth::Basic {
            user: "u".into(),
            password: Secret::from("hunter2"),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Token(Secret::from("tok"))).contains("tok"));
        let u: Url = "http://user:pw@m1:8080/v2/apps?embed=apps.tasks"
            .parse()
            .unwrap();
        assert_eq!(redact(&u), "http://m1:8080/v2/apps");
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
