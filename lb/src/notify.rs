//! systemd's service notifications (sd_notify(3)) for a `Type=notify` unit
//! (`contrib/systemd/lb.service`):
//!
//! - `READY=1` once the member is ready: the moment `/ready` starts answering 200 (mesh,
//!   admin API, data plane and proxy up), so `systemctl start` returns only then and units
//!   ordered after it find the member working;
//! - `WATCHDOG=1` every half of the unit's `WatchdogSec` (`WATCHDOG_USEC`), as long as the
//!   runtime turns **and** the data plane, if configured, still runs: a data plane that
//!   stopped leaves traffic unclassified (fail-open) until a restart, and a missed watchdog
//!   is how systemd learns to do that restart (`Restart=on-failure`);
//! - `STOPPING=1` when SIGTERM or SIGINT starts the leave sequence;
//! - `STATUS=...`, a line `systemctl status` shows.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed send is
//! logged once at WARN and never stops the daemon.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

static WARNED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    // The environment stays as it is: the daemon is multi-threaded by now.
    if let Err(e) = sd_notify::notify(false, states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A status line alone.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// How often to ping the watchdog: half the unit's `WatchdogSec`, if it has one for this
/// process (`WATCHDOG_USEC`, and `WATCHDOG_PID` naming this process when set).
pub fn watchdog_every() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog every `every` while `healthy()` holds; stops pinging (once, with an
/// ERROR line) when it does not, so that systemd restarts the member. Ends when `stop` turns
/// true.
pub async fn watchdog(
    every: Duration,
    healthy: impl Fn() -> Result<(), &'static str>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match healthy() {
            Ok(()) => {
                failed = false;
                send(&[NotifyState::Watchdog]);
            }
            Err(why) if !failed => {
                failed = true;
                tracing::error!(why, "watchdog pings stopped: systemd will restart this member (WatchdogSec)");
                status(&format!("unhealthy: {why}"));
            }
            Err(_) => {}
        }
    }
}
