//! The status page at `GET /`: one HTML file embedded in the binary (`include_str!`), plain
//! JavaScript and SVG, nothing fetched from elsewhere. The page itself is open (it holds no
//! data); its data calls go to `/v1/vips`, `/v1/label-errors` and `/metrics` with the bearer
//! token when `--api-token-file` is set (the page reads it from the URL fragment
//! `#token=...`, which browsers never send to the server, or asks for it once and keeps it
//! in the tab's session storage).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// The page, as shipped.
pub(super) const HTML: &str = include_str!("page.html");

/// Only this page's own inline script and style, and calls to this origin.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'";

pub(super) async fn page() -> Response {
    let mut resp = HTML.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "//cdn", "<link", "src=\""] {
            // The SVG namespace is a name, not a fetch.
            let hits = HTML
                .match_indices(needle)
                .filter(|(i, _)| !HTML[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(hits, 0, "{needle} in page.html");
        }
    }
}
