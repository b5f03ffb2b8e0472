//! `balancer --check --diff URL`: the effective config (file + overrides) against the one a
//! running balancer serves at its admin `GET /config`, as a unified diff, so an edit can be
//! seen before it is saved or reloaded.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// How long the running balancer has to answer, connect included.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `URL/config` (`URL`: the admin listener, `http://127.0.0.1:9901` or just
/// `127.0.0.1:9901`). The error says why in one line.
pub fn fetch_running(url: &str) -> Result<String, String> {
    let base = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
    let uri: http::Uri = format!("{}/config", base.trim_end_matches('/')).parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: the admin listener speaks plain http://"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let get = async {
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(uri.path())
            .header(http::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!("GET /config answered {status}: is this balancer's admin listener?"));
        }
        String::from_utf8(body.to_vec()).map_err(|_| "GET /config answered with something not UTF-8".to_owned())
    };
    runtime
        .block_on(async { tokio::time::timeout(TIMEOUT, get).await })
        .unwrap_or_else(|_| Err(format!("no answer within {}s", TIMEOUT.as_secs())))
        .map_err(|e| format!("{uri}: {e}"))
}

/// A unified diff from `running` to `effective` (empty when they are the same), with
/// three lines of context and the two names in its header.
pub fn unified(running: &str, effective: &str, running_name: &str, effective_name: &str) -> String {
    similar::TextDiff::from_lines(running, effective)
        .unified_diff()
        .context_radius(3)
        .header(running_name, effective_name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_no_diff_and_a_change_is_one_hunk() {
        assert_eq!(unified("a = 1\n", "a = 1\n", "running", "file"), "");
        let d = unified("a = 1\nb = 2\n", "a = 1\nb = 3\n", "running", "file");
        assert_eq!(d, "--- running\n+++ file\n@@ -1,2 +1,2 @@\n a = 1\n-b = 2\n+b = 3\n");
    }

    #[test]
    fn bad_urls_say_why() {
        assert!(fetch_running("https://127.0.0.1:1").unwrap_err().contains("plain http://"));
        assert!(fetch_running("http://").is_err());
    }
}
