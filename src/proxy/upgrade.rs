//! WebSocket and other `Upgrade`s: once the backend answers 101, bytes are copied both
//! ways until either side closes. The tunnel holds the backend's in-flight count and
//! marks the client connection busy for as long as it lives.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::backend::InflightGuard;
use crate::server::ActivityGuard;

pub fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    inflight: InflightGuard,
    activity: ActivityGuard,
) {
    tokio::spawn(async move {
        let _held = (inflight, activity);
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut c, mut b) = (TokioIo::new(client), TokioIo::new(backend));
        match tokio::io::copy_bidirectional(&mut c, &mut b).await {
            Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
        }
    });
}
