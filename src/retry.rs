//! Waiting for a server with backoff: every port call of the driver goes through [`with_retry`], so a
//! server that goes away stalls the loop (inputs stay unacknowledged and come again) rather than crashing
//! it, and a shutdown ends the wait. The adapters, the app and the engine sidecars wait with the same
//! [`backoff`], and describe errors with [`causes`]: a module of its own, below all of them.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;

use crate::ports::deposed_in;

/// At shutdown, how long an operation in flight may take to finish before it is abandoned.
const SETTLE_AT_STOP: Duration = Duration::from_secs(2);

/// The waits between tries of a server that failed: from 50 ms, doubling with jitter, up to 5 s
/// apart, without end.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Retries `op` with exponential backoff (up to 5 s apart) until it succeeds or `shutdown` is
/// cancelled, logging each failure with `what`. A write refused for a newer leadership term
/// ([`Deposed`]) is not retried: the error carries the refusal, for [`is_deposed`].
pub async fn with_retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    op: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + 'static,
{
    let attempt = op
        .retry(backoff())
        .when(|e| deposed_in(e).is_none())
        .notify(|e, wait| tracing::warn!("{what}: {}; retrying in {wait:?}", causes(e)));
    let failed = |e: E| match deposed_in(&e) {
        Some(deposed) => anyhow::Error::new(deposed.clone()).context(what.to_owned()),
        None => anyhow::anyhow!("{what}: {}", causes(&e)),
    };
    tokio::pin!(attempt);
    tokio::select! {
        result = &mut attempt => result.map_err(failed),
        _ = shutdown.cancelled() => {
            // Work in flight settles (a publish waiting for its PubAck); a server that is away is not
            // waited for.
            match tokio::time::timeout(SETTLE_AT_STOP, &mut attempt).await {
                Ok(result) => result.map_err(failed),
                Err(_) => anyhow::bail!("{what}: stopped while waiting for the server"),
            }
        }
    }
}

/// Whether an error of the driver is a write refused for a newer leadership term.
pub fn is_deposed(error: &anyhow::Error) -> bool {
    error.chain().any(|e| deposed_in(e).is_some())
}

/// An error with its causes, `outer: inner: root`, so that a log line says what really failed.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn causes_name_every_level_once() {
        assert_eq!(causes(&Outer(Inner)), "outer: inner");
    }

    #[tokio::test]
    async fn a_failing_server_is_retried_until_it_answers() {
        let shutdown = CancellationToken::new();
        let mut calls = 0;
        let answer = with_retry("test", &shutdown, || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(Outer(Inner))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .expect("answers on the third call");
        assert_eq!(answer, 3);
    }

    #[tokio::test]
    async fn a_deposed_writer_is_not_retried() {
        let shutdown = CancellationToken::new();
        let mut calls = 0;
        let result: anyhow::Result<()> = with_retry("writing", &shutdown, || {
            calls += 1;
            async {
                Err(crate::ports::PortError::new(crate::ports::Deposed {
                    term: 1,
                    detail: "term 2 leads".into(),
                }))
            }
        })
        .await;
        let error = result.expect_err("refused");
        assert!(is_deposed(&error), "{error:#}");
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait_for_a_server_that_is_away() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let result: anyhow::Result<()> =
            with_retry("test", &shutdown, || async { Err(Outer(Inner)) }).await;
        let error = result.expect_err("a server that never answers is given up at shutdown");
        assert!(error.to_string().contains("test"), "{error}");
    }
}
