//! Waits stretched for slow guests: one home for how much longer than on a host the
//! harness waits (every runtime, the stack and the scenarios take their deadlines here).

use std::time::{Duration, Instant};

/// How much longer than on a host to wait: TCG guests run an order of magnitude slower.
pub fn patience() -> f64 {
    if let Some(p) = std::env::var("RTHOOKS_E2E_PATIENCE")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return p;
    }
    if std::env::var_os("RTHOOKS_KERNEL").is_some() {
        6.0
    } else {
        1.0
    }
}

/// `n` seconds, stretched by [`patience`].
pub fn secs(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 * patience())
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
