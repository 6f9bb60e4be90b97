//! What every HTTP source shares (Marathon, the Mesos master, an agent's controller watch):
//! the credentials a request carries ([`Auth`]), one error type with its metric label
//! ([`Error::kind`]), the request and stream clients with answers read under a cap
//! ([`Transport`], [`read_capped`]), URLs fit for logs ([`redact`]) and the back-off between
//! failed attempts ([`Backoff`]). A service account's token comes from its login
//! ([`super::acs`]), which [`Transport::send`] asks and renews. Neutral: it knows no source,
//! and no source imports another.

use std::time::Duration;

use std::sync::Arc;

use rand::RngExt;
use reqwest::{RequestBuilder, Response, StatusCode, Url, header};
use tokio_util::sync::CancellationToken;

use super::acs::{self, Login, LoginError, ServiceAccount};
use crate::model::Secret;
use crate::tls::CaBundle;

/// How a source authenticates. `Debug` shows no secret. The static kinds are added by
/// [`Auth::apply`]; a service account's token by [`Transport::send`], which logs in.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    /// `user:password`
    Basic { user: String, password: Secret },
    /// DC/OS ACS token, sent as `Authorization: token=<token>`.
    Token(Secret),
    /// Sent as `Authorization: Bearer <token>` (an l4lb controller's `--api-token-file`).
    Bearer(Secret),
    /// DC/OS strict mode: a token obtained by logging in, sent as `Authorization:
    /// token=<token>`.
    ServiceAccount(ServiceAccount),
}

impl Auth {
    /// `rb` carrying these credentials (a service account's: none; its login is
    /// [`Transport`]'s).
    pub fn apply(&self, rb: RequestBuilder) -> RequestBuilder {
        match self {
            Auth::None | Auth::ServiceAccount(_) => rb,
            Auth::Basic { user, password } => rb.basic_auth(user, Some(password.expose())),
            Auth::Token(t) => rb.header(header::AUTHORIZATION, format!("token={}", t.expose())),
            Auth::Bearer(t) => rb.header(header::AUTHORIZATION, format!("Bearer {}", t.expose())),
        }
    }
}

/// Why a request to a source failed. URLs in it are [`redact`]ed.
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
    /// No server configured; names what is missing ("Marathon", "Mesos master").
    #[error("no {0} URL configured")]
    NoMasters(&'static str),
    #[error("{url} sent more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("service-account {0}")]
    Login(#[from] LoginError),
}

impl Error {
    /// Metric label for the error (`l4lb_sync_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Http { source, .. } if source.is_timeout() => "timeout",
            Error::Http { source, .. } if source.is_connect() => "connect",
            Error::Http { .. } => "http",
            Error::Status { status, .. } if status.is_server_error() => "status_5xx",
            Error::Status { .. } => "status",
            Error::BadRedirect { .. } | Error::TooManyRedirects(_) => "redirect",
            Error::NoMasters(_) => "config",
            Error::TooLarge { .. } => "too_large",
            Error::Login(e) if e.is_transport() => "login_http",
            Error::Login(_) => "login",
        }
    }

    /// A transport failure of a request to `url`.
    pub fn http(url: &Url, e: reqwest::Error) -> Self {
        Error::Http {
            url: redact(url),
            source: e.without_url(),
        }
    }

    /// An answer to `url` that is not a success.
    pub fn status(url: &Url, status: StatusCode) -> Self {
        Error::Status {
            url: redact(url),
            status,
        }
    }
}

/// Largest answer a source reads unless told otherwise. At the sizes of the real payloads in
/// `tests/fixtures/marathon`, 10,000 apps with 3 tasks each are about 23 MB; a larger answer
/// than this (a broken proxy, say) is an error that keeps the last good table, not an
/// out-of-memory kill.
pub const MAX_BODY: usize = 1 << 30;

/// What a source client holds whatever its API: the servers it may ask (the masters), the two
/// clients (one for requests, bounded by the timeout; one for streams that stay open, bounded
/// only on connect), its credentials (with a service account, its one [`Login`], shared by
/// every clone) and its answer cap. `Debug` shows the masters as in logs and no secret.
#[derive(Clone)]
pub struct Transport {
    masters: Vec<Url>,
    request: reqwest::Client,
    stream: reqwest::Client,
    auth: Auth,
    login: Option<Arc<Login>>,
    max_body: usize,
}

impl Transport {
    /// Clients for `masters` (given as `flag`) with `timeout` per request (and on connect, at
    /// most 5 s); redirects are followed by reqwest unless `follow_redirects` is false (the
    /// caller follows them); `ca`'s roots are trusted beside the system's (for the masters
    /// and the login). A password in a master's URL is warned about.
    pub fn new(
        flag: &str,
        masters: Vec<Url>,
        auth: Auth,
        timeout: Duration,
        follow_redirects: bool,
        ca: Option<&CaBundle>,
    ) -> Result<Self, reqwest::Error> {
        warn_passwords(flag, &masters);
        let base = || {
            let b = crate::tls::client_builder_with(ca)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .tcp_keepalive(Duration::from_secs(30));
            if follow_redirects {
                b
            } else {
                b.redirect(reqwest::redirect::Policy::none())
            }
        };
        let login = match &auth {
            Auth::ServiceAccount(account) => {
                let http = base().timeout(timeout).build()?;
                Some(Arc::new(Login::new(account.clone(), http)))
            }
            _ => None,
        };
        Ok(Transport {
            masters,
            request: base().timeout(timeout).build()?,
            stream: base().build()?,
            auth,
            login,
            max_body: MAX_BODY,
        })
    }

    /// Refuse answers longer than `bytes` (default [`MAX_BODY`]).
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The servers to ask, as configured.
    pub fn masters(&self) -> &[Url] {
        &self.masters
    }

    /// The longest answer (or stream record) read.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// A request builder (`stream`: for an answer that stays open) with the static
    /// credentials; a service account's token is added by [`Transport::send`].
    pub fn request(&self, method: reqwest::Method, url: Url, stream: bool) -> RequestBuilder {
        let client = if stream { &self.stream } else { &self.request };
        self.auth.apply(client.request(method, url))
    }

    /// Send `rb` (built by [`Transport::request`] for `url`). With a service account: with
    /// its token (logging in when there is none or it is old), and when the master refuses
    /// it (401, `WWW-Authenticate: acsjwt`), once more after a new login.
    pub async fn send(&self, url: &Url, rb: RequestBuilder) -> Result<Response, Error> {
        let Some(login) = &self.login else {
            return rb.send().await.map_err(|e| Error::http(url, e));
        };
        let again = rb.try_clone();
        let (token, generation) = login.token().await?;
        let resp = rb
            .header(header::AUTHORIZATION, token)
            .send()
            .await
            .map_err(|e| Error::http(url, e))?;
        let Some(again) = again.filter(|_| acs::refuses_token(&resp)) else {
            return Ok(resp);
        };
        tracing::info!(url = %redact(url), "token refused (401 acsjwt); logging in again");
        let (token, _) = login.renew(Some(generation)).await?;
        again
            .header(header::AUTHORIZATION, token)
            .send()
            .await
            .map_err(|e| Error::http(url, e))
    }

    /// `resp`'s whole body, at most [`Transport::max_body`] bytes.
    pub async fn body(&self, resp: Response) -> Result<Vec<u8>, Error> {
        let url = resp.url().clone();
        let limit = self.max_body;
        read_capped(resp, limit).await.map_err(|e| match e {
            ReadError::TooLarge => Error::TooLarge {
                url: redact(&url),
                limit,
            },
            ReadError::Http(e) => Error::http(&url, e),
        })
    }
}

/// A source's client of its masters: a [`Transport`] and what it learns between requests
/// (the master that last answered, the leader). Each source names its flag and whether reqwest
/// follows redirects; the constructors are shared.
pub trait SourceClient: Sized {
    /// The flag naming the masters (in the warning about a password in a URL).
    const FLAG: &'static str;
    /// Whether reqwest follows redirects (false: the client follows them itself).
    const FOLLOW_REDIRECTS: bool;

    /// A client over `http` that has learnt nothing yet.
    fn over(http: Transport) -> Self;

    /// The transport it sends with.
    fn transport_mut(&mut self) -> &mut Transport;

    /// A client of `masters`, base URLs (`http://m1:5050/`); `timeout` bounds each request
    /// except an open stream (whose connect it bounds).
    fn new(masters: Vec<Url>, auth: Auth, timeout: Duration) -> Result<Self, reqwest::Error> {
        Self::new_with_ca(masters, auth, timeout, None)
    }

    /// As [`SourceClient::new`], trusting `ca`'s roots too (`--ca-file`).
    fn new_with_ca(
        masters: Vec<Url>,
        auth: Auth,
        timeout: Duration,
        ca: Option<&CaBundle>,
    ) -> Result<Self, reqwest::Error> {
        let http = Transport::new(
            Self::FLAG,
            masters,
            auth,
            timeout,
            Self::FOLLOW_REDIRECTS,
            ca,
        )?;
        Ok(Self::over(http))
    }

    /// Refuse answers (and stream records) longer than `bytes` (default [`MAX_BODY`]).
    fn with_max_body(mut self, bytes: usize) -> Self {
        self.transport_mut().max_body = bytes;
        self
    }
}

/// Why [`read_capped`] stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The answer is longer than the limit (declared or as read).
    TooLarge,
    Http(reqwest::Error),
}

/// An HTTP answer's body, at most `limit` bytes: refused at once when its declared length is
/// over, else read chunk by chunk (no extra copy) until it ends or passes the limit. Every
/// source reads through here (Marathon, Mesos, an agent's controller watch), so one cap
/// bounds them all.
pub(crate) async fn read_capped(mut resp: Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    let declared = resp.content_length().unwrap_or(0);
    if declared > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::with_capacity(declared as usize);
    while let Some(c) = resp.chunk().await.map_err(ReadError::Http)? {
        if out.len() + c.len() > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// A URL fit for logs: no user info, no query.
pub fn redact(u: &Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masters: Vec<String> = self.masters.iter().map(redact).collect();
        f.debug_struct("Transport")
            .field("masters", &masters)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Warn about every URL in `urls` that carries a password: a password in a flag is visible
/// to every user in `ps` and `/proc/<pid>/cmdline`.
fn warn_passwords(flag: &str, urls: &[Url]) {
    for u in with_password(urls) {
        tracing::warn!(
            url = %u,
            "a password in a {flag} URL is visible to every user in ps and /proc/<pid>/cmdline; \
             use --source-auth basic with --source-credentials-file instead"
        );
    }
}

/// The URLs (redacted) that carry a password.
fn with_password(urls: &[Url]) -> Vec<String> {
    urls.iter()
        .filter(|u| u.password().is_some())
        .map(redact)
        .collect()
}

/// Exponential back-off with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next wait: uniformly random in [min, current], then `current` doubles up to max.
    pub fn next_delay(&mut self) -> Duration {
        let hi = self.current.max(self.min);
        let ms = rand::rng().random_range(self.min.as_millis() as u64..=hi.as_millis() as u64);
        self.current = (self.current * 2).min(self.max);
        Duration::from_millis(ms)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// Sleep the next wait; `false` when `shutdown` came first.
    pub async fn pause(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
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
        let u: Url = "http://user:pw@m1:8080/v2/apps?embed=apps.tasks"
            .parse()
            .unwrap();
        assert_eq!(redact(&u), "http://m1:8080/v2/apps");
    }

    #[test]
    fn secrets_never_in_debug() {
        let a = Auth::Basic {
            user: "u".into(),
            password: Secret::from("hunter2"),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert!(!format!("{:?}", Auth::Token(Secret::from("tok"))).contains("tok"));
        assert!(!format!("{:?}", Auth::Bearer(Secret::from("tok"))).contains("tok"));
    }

    #[test]
    fn login_errors_have_their_kind() {
        let e = Error::Login(LoginError::NoToken { url: "u".into() });
        assert_eq!(e.kind(), "login");
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1600));
        let mut prev_cap = Duration::from_millis(100);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(100) && d <= prev_cap,
                "{d:?} > {prev_cap:?}"
            );
            prev_cap = (prev_cap * 2).min(Duration::from_millis(1600));
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
