//! The web pages the hub serves: the customer portal (`/portal/`), the tracking page of a
//! link (`/t/{token}`), the operator console (`/console/`) and their assets
//! (`/assets/{name}`). Every byte is embedded in the binary from `hub/web/`: no CDN, no
//! web fonts, no map tiles, no build step.
//!
//! The pages are static HTML shells; a little JavaScript per page calls the JSON APIs
//! (`/v1/portal`, `/t/{token}/json`, `/v1/ops`) and their streams. Tokens live in the
//! tab's `sessionStorage` and travel as `Authorization: Bearer`, never as cookies, so no
//! request can carry them without the page's own script (no CSRF). The HTML is the same
//! for everyone: nothing a page says depends on who asks, except `/t/{token}`, which is
//! a 404 page, the same for every bad link, unless the link is genuine and live.
//!
//! ```text
//! every page:  Content-Security-Policy (scripts, styles, images, fetches: this origin
//!              only; no inline script or style), nosniff, no framing, no referrer
//! assets:      ETag (sha256 of the bytes) + Cache-Control: no-cache (revalidated, 304)
//! ```

use std::sync::LazyLock;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::api::AppState;

/// The pages' Content-Security-Policy. `blob:` images: the console shows review evidence
/// it fetched with its token. `data:` images: none today, kept out.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $mime:literal) => {
        Asset {
            name: $name,
            mime: $mime,
            bytes: include_bytes!(concat!("../../web/", $name)),
        }
    };
}

/// Everything under `/assets/`.
static ASSETS: &[Asset] = &[
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("common.js", "text/javascript; charset=utf-8"),
    asset!("portal.js", "text/javascript; charset=utf-8"),
    asset!("tracking.js", "text/javascript; charset=utf-8"),
    asset!("console.js", "text/javascript; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

const PORTAL_HTML: &str = include_str!("../../web/portal.html");
const TRACKING_HTML: &str = include_str!("../../web/tracking.html");
const CONSOLE_HTML: &str = include_str!("../../web/console.html");
const NOT_FOUND_HTML: &str = include_str!("../../web/notfound.html");

/// The ETag of each asset, by index into [`ASSETS`].
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| format!("\"{}\"", hex::encode(&Sha256::digest(a.bytes)[..12])))
        .collect()
});

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A tracking page's URL is its secret: it must not leave in a Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

fn page(status: StatusCode, html: &'static str) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response();
    security_headers(r.headers_mut());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The 404 page: the same bytes for every page or link that is not there.
pub fn not_found() -> Response {
    page(StatusCode::NOT_FOUND, NOT_FOUND_HTML)
}

async fn portal() -> Response {
    page(StatusCode::OK, PORTAL_HTML)
}

async fn console() -> Response {
    page(StatusCode::OK, CONSOLE_HTML)
}

/// `GET /t/{token}`: the tracking page while the link is genuine, live, not revoked and
/// within its rate; otherwise the 404 page (or the API's 429 while over its rate).
async fn tracking(State(st): State<AppState>, Path(token): Path<String>) -> Response {
    match crate::api::portal::link_target(&st, &token).await {
        Ok(Some((claims, _, _))) => match crate::api::portal::link_rate(&st, &claims) {
            Some(too_many) => too_many,
            None => page(StatusCode::OK, TRACKING_HTML),
        },
        Ok(None) => not_found(),
        Err(e) => e.into_response(),
    }
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return not_found();
    };
    let (a, etag) = (&ASSETS[i], &ETAGS[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.mime)], a.bytes).into_response()
    };
    let h = r.headers_mut();
    security_headers(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    r
}

/// The pages' routes (merged into [`crate::api::app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/portal/") }))
        .route("/portal", get(|| async { Redirect::permanent("/portal/") }))
        .route("/portal/", get(portal))
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(console))
        .route("/t/{token}", get(tracking))
        .route("/assets/{name}", get(asset))
        .route(
            "/favicon.ico",
            get(|| async { Redirect::permanent("/assets/favicon.svg") }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page and script obeys the CSP it is served with: no inline script, no
    /// inline event handler, no inline style, nothing from another origin.
    #[test]
    fn pages_and_scripts_need_nothing_the_csp_forbids() {
        let pages = [PORTAL_HTML, TRACKING_HTML, CONSOLE_HTML, NOT_FOUND_HTML];
        for html in pages {
            let lower = html.to_ascii_lowercase();
            for (i, _) in lower.match_indices("<script") {
                let tag = &lower[i..i + lower[i..].find('>').unwrap_or(0)];
                assert!(tag.contains("src=\"/assets/"), "inline script: {tag}");
            }
            assert!(!lower.contains(" style="), "inline style attribute");
            assert!(!lower.contains("<style"), "inline style element");
            assert!(!lower.contains("http://") && !lower.contains("https://"));
            assert!(!lower.contains(" onclick=") && !lower.contains(" onload="));
            assert!(lower.contains("<meta name=\"viewport\""), "phone layout");
            assert!(lower.contains("<html lang="), "language for screen readers");
        }
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(a.bytes)
                .unwrap_or_default()
                .replace("'http://www.w3.org/2000/svg'", "'svg namespace'");
            for bad in [
                "eval(",
                "new Function",
                "innerHTML",
                "setAttribute('style'",
                "http://",
                "https://",
            ] {
                assert!(!text.contains(bad), "{}: {bad}", a.name);
            }
        }
    }

    #[test]
    fn every_asset_a_page_names_is_embedded() {
        for html in [PORTAL_HTML, TRACKING_HTML, CONSOLE_HTML, NOT_FOUND_HTML] {
            for (i, _) in html.match_indices("/assets/") {
                let rest = &html[i + "/assets/".len()..];
                let name = &rest[..rest.find('"').unwrap_or(0)];
                assert!(ASSETS.iter().any(|a| a.name == name), "{name} not embedded");
            }
        }
    }
}
