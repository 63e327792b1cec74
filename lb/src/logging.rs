//! Logs: the format (text or JSON), the level, colours only on a terminal, and a throttle
//! that lets a burst of identical messages through per window and then counts the rest
//! ("suppressed N identical messages"), so a hot error path (an accept loop out of
//! descriptors) cannot fill a disk or the journal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The target of the throttle's own summary lines (never throttled themselves).
pub const THROTTLE_TARGET: &str = "lb::log";

/// Keys tracked at most; messages beyond are logged unthrottled rather than forgotten.
const MAX_KEYS: usize = 4096;

/// `--log-format` / `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colours only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// Filter directives ("info", "info,cluster_proto=debug").
    pub filter: String,
    /// Identical messages let through per window; 0 turns the throttle off.
    pub throttle_burst: u32,
    /// The throttle's window.
    pub throttle_window: Duration,
    /// The filter came from `log.level` (or its default), not from `--log-level` or
    /// `RUST_LOG`: a reload of `log.level` changes it.
    pub filter_from_config: bool,
}

impl LogSettings {
    /// Settings by precedence: the `--log-level` flag, then `RUST_LOG`, then `log.level`,
    /// then "info"; the `--log-format` flag, then `log.format`.
    pub fn resolve(
        flag_format: Option<LogFormat>,
        flag_level: Option<&str>,
        env_level: Option<&str>,
        config: Option<&crate::config::LogSection>,
    ) -> LogSettings {
        let default = crate::config::LogSection::default();
        let c = config.unwrap_or(&default);
        let overridden = flag_level.or(env_level.filter(|l| !l.is_empty()));
        let filter = overridden.or(c.level.as_deref()).unwrap_or("info").to_string();
        LogSettings {
            filter_from_config: overridden.is_none(),
            format: flag_format.unwrap_or(c.format),
            filter,
            throttle_burst: c.throttle_burst,
            throttle_window: Duration::from_secs(c.throttle_window_s),
        }
    }
}

/// Checks filter directives (`--log-level`, `log.level`, `RUST_LOG`).
pub fn check_filter(directives: &str) -> Result<(), String> {
    EnvFilter::try_new(directives).map(|_| ()).map_err(|e| format!("{directives:?} is not a log filter: {e}"))
}

/// Installs the global subscriber on stderr; starts the thread that writes the throttle's
/// summaries. An invalid filter is an error (checked before anything is logged).
pub fn init(s: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&s.filter).map_err(|e| anyhow::anyhow!("log level {:?}: {e}", s.filter))?;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = FILTER.set(Reloadable { handle, from_config: s.filter_from_config });
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let throttle = (s.throttle_burst > 0).then(|| Throttle::new(s.throttle_burst, s.throttle_window, system_clock()));
    let registry = tracing_subscriber::registry().with(filter).with(throttle.clone());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match s.format {
        LogFormat::Text => registry.with(fmt.with_ansi(ansi)).try_init()?,
        LogFormat::Json => registry.with(fmt.json().with_ansi(false)).try_init()?,
    }
    if let Some(t) = throttle {
        let period = s.throttle_window.min(Duration::from_secs(1));
        std::thread::Builder::new().name("log-throttle".into()).spawn(move || loop {
            std::thread::sleep(period);
            t.flush();
        })?;
    }
    Ok(())
}

/// The installed filter, for a reload of `log.level`.
struct Reloadable {
    handle: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    from_config: bool,
}

static FILTER: std::sync::OnceLock<Reloadable> = std::sync::OnceLock::new();

/// What [`set_level`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `--log-level` or `RUST_LOG` set the level at start; they keep winning.
    Overridden,
    /// No subscriber of ours is installed (a library user, a test).
    NotInstalled,
}

/// A reload of `log.level` (`None`: "info"), checked like at start.
pub fn set_level(level: Option<&str>) -> Result<LevelChange, String> {
    let directives = level.unwrap_or("info");
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?} is not a log filter: {e}"))?;
    let Some(r) = FILTER.get() else { return Ok(LevelChange::NotInstalled) };
    if !r.from_config {
        return Ok(LevelChange::Overridden);
    }
    r.handle.reload(filter).map_err(|e| e.to_string())?;
    Ok(LevelChange::Applied)
}

/// A source of "now", so tests can move time by hand.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The real clock.
pub fn system_clock() -> Clock {
    Arc::new(Instant::now)
}

/// What makes two events identical: level, target, call site and message text.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    level: Level,
    target: String,
    callsite: &'static str,
    message: String,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

/// A count of suppressed messages, reported once their window is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// The level of the suppressed messages.
    pub level: Level,
    /// Their target.
    pub target: String,
    /// Their message.
    pub message: String,
    /// How many were not written.
    pub count: u64,
}

/// The throttle's bookkeeping, without a clock or tracing (unit-tested alone).
#[derive(Debug)]
struct ThrottleState {
    burst: u32,
    window: Duration,
    windows: HashMap<Key, Window>,
    /// Counts of windows that ended when a new one started (reported by the next flush).
    ended: Vec<Suppressed>,
}

impl ThrottleState {
    fn new(burst: u32, window: Duration) -> Self {
        ThrottleState { burst, window, windows: HashMap::new(), ended: Vec::new() }
    }

    /// True when the event may be written.
    fn admit(&mut self, key: Key, now: Instant) -> bool {
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_KEYS {
            return true;
        }
        let window = self.window;
        let w = self.windows.entry(key.clone()).or_insert(Window { start: now, passed: 0, suppressed: 0 });
        if now.saturating_duration_since(w.start) >= window {
            if w.suppressed > 0 {
                self.ended.push(Suppressed {
                    level: key.level,
                    target: key.target,
                    message: key.message,
                    count: w.suppressed,
                });
            }
            *w = Window { start: now, passed: 0, suppressed: 0 };
        }
        if w.passed < self.burst {
            w.passed += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// The counts of every window over by `now` that suppressed something; forgets ended
    /// windows (the map holds only keys seen within a window).
    fn flush(&mut self, now: Instant) -> Vec<Suppressed> {
        let mut out = std::mem::take(&mut self.ended);
        let window = self.window;
        self.windows.retain(|k, w| {
            if now.saturating_duration_since(w.start) < window {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    level: k.level,
                    target: k.target.clone(),
                    message: k.message.clone(),
                    count: w.suppressed,
                });
            }
            false
        });
        out
    }
}

/// A [`Layer`] that disables, for every layer after it, identical INFO, WARN and ERROR events
/// beyond `burst` per `window`; [`Throttle::flush`] writes what each ended window suppressed.
#[derive(Clone)]
pub struct Throttle {
    state: Arc<Mutex<ThrottleState>>,
    clock: Clock,
}

impl Throttle {
    /// A throttle letting `burst` identical messages through per `window`.
    pub fn new(burst: u32, window: Duration, clock: Clock) -> Self {
        Throttle { state: Arc::new(Mutex::new(ThrottleState::new(burst, window))), clock }
    }

    /// Writes a WARN "suppressed N identical messages" line (target [`THROTTLE_TARGET`]) for
    /// each window over by now that suppressed any; returns what it wrote. Called from outside
    /// the subscriber (a tracing callback cannot log), by the thread [`init`] starts.
    pub fn flush(&self) -> Vec<Suppressed> {
        let now = (self.clock)();
        let (out, secs) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            (state.flush(now), state.window.as_secs_f64())
        };
        for s in &out {
            tracing::warn!(
                target: THROTTLE_TARGET,
                suppressed = s.count,
                of_level = %s.level,
                of_target = %s.target,
                "suppressed {} identical messages in {secs} s: {}",
                s.count,
                s.message
            );
        }
        out
    }
}

/// Collects an event's message text.
#[derive(Default)]
struct MessageText(String);

impl Visit for MessageText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write;
            let _ = write!(self.0, "{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for Throttle {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::INFO || meta.target() == THROTTLE_TARGET {
            return true;
        }
        let mut text = MessageText::default();
        event.record(&mut text);
        let key =
            Key { level: *meta.level(), target: meta.target().to_string(), callsite: meta.name(), message: text.0 };
        let now = (self.clock)();
        self.state.lock().unwrap_or_else(|e| e.into_inner()).admit(key, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn key(message: &str) -> Key {
        Key { level: Level::WARN, target: "t".into(), callsite: "c", message: message.into() }
    }

    #[test]
    fn burst_then_suppressed_then_counted_when_the_window_ends() {
        let t0 = Instant::now();
        let mut s = ThrottleState::new(3, Duration::from_secs(10));
        let admitted: Vec<bool> = (0..5).map(|_| s.admit(key("accept failed"), t0)).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        // Another message has its own budget.
        assert!(s.admit(key("other"), t0));
        assert_eq!(s.flush(t0 + Duration::from_secs(9)), vec![]);
        let flushed = s.flush(t0 + Duration::from_secs(10));
        assert_eq!(
            flushed,
            vec![Suppressed { level: Level::WARN, target: "t".into(), message: "accept failed".into(), count: 2 }]
        );
        // The flush forgot both windows; a new one starts with a full burst.
        assert!(s.windows.is_empty());
        assert!(s.admit(key("accept failed"), t0 + Duration::from_secs(11)));
        assert_eq!(s.flush(t0 + Duration::from_secs(30)), vec![]);
    }

    #[test]
    fn a_window_ending_at_the_next_event_is_reported_by_the_next_flush() {
        let t0 = Instant::now();
        let mut s = ThrottleState::new(1, Duration::from_secs(10));
        assert!(s.admit(key("m"), t0));
        assert!(!s.admit(key("m"), t0 + Duration::from_secs(1)));
        assert!(!s.admit(key("m"), t0 + Duration::from_secs(2)));
        // Window over: this one passes and the old window's count waits for the flush.
        assert!(s.admit(key("m"), t0 + Duration::from_secs(10)));
        assert!(!s.admit(key("m"), t0 + Duration::from_secs(11)));
        let flushed = s.flush(t0 + Duration::from_secs(12));
        assert_eq!(flushed.iter().map(|x| x.count).collect::<Vec<_>>(), [2]);
        let flushed = s.flush(t0 + Duration::from_secs(20));
        assert_eq!(flushed.iter().map(|x| x.count).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn keys_beyond_the_bound_are_let_through() {
        let t0 = Instant::now();
        let mut s = ThrottleState::new(1, Duration::from_secs(10));
        for i in 0..MAX_KEYS {
            assert!(s.admit(key(&i.to_string()), t0));
        }
        for _ in 0..3 {
            assert!(s.admit(key("one too many"), t0));
        }
        assert_eq!(s.windows.len(), MAX_KEYS);
    }

    /// A writer into a shared buffer, for a real fmt layer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
        }
    }

    #[test]
    fn layer_with_a_fake_clock_writes_a_burst_and_then_the_count() {
        let base = Instant::now();
        let offset = Arc::new(AtomicU64::new(0));
        let o = offset.clone();
        let clock: Clock = Arc::new(move || base + Duration::from_millis(o.load(Ordering::SeqCst)));
        let throttle = Throttle::new(5, Duration::from_secs(10), clock);
        let buf = Buffer::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(throttle.clone())
            .with(tracing_subscriber::fmt::layer().with_ansi(false).without_time().with_writer(move || w.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // One call site, as in an accept loop.
            let accept_failed = |error: &str| tracing::warn!(error, "accept failed");
            for i in 0..100 {
                // Other field values, same call site and message: identical for the throttle.
                accept_failed(if i % 2 == 0 { "Too many open files" } else { "Connection reset" });
            }
            tracing::debug!("debug is never throttled");
            tracing::info!("a different message");
            let lines = buf.lines();
            assert_eq!(lines.iter().filter(|l| l.contains("accept failed")).count(), 5, "{lines:#?}");
            assert!(lines.iter().any(|l| l.contains("a different message")));
            assert!(throttle.flush().is_empty(), "the window is not over");
            offset.store(10_000, Ordering::SeqCst);
            let flushed = throttle.flush();
            assert_eq!(flushed.iter().map(|s| s.count).collect::<Vec<_>>(), [95]);
            let lines = buf.lines();
            let summary = lines.iter().find(|l| l.contains("suppressed 95 identical messages")).expect("summary");
            assert!(summary.contains("WARN") && summary.contains("accept failed"), "{summary}");
            // A new window: the message is written again.
            accept_failed("Too many open files");
            assert_eq!(buf.lines().iter().filter(|l| l.contains("accept failed error=")).count(), 6);
        });
    }

    #[test]
    fn precedence_flag_then_env_then_config() {
        let c = crate::config::LogSection { format: LogFormat::Json, level: Some("warn".into()), ..Default::default() };
        let s = LogSettings::resolve(None, None, None, Some(&c));
        assert_eq!((s.format, s.filter.as_str()), (LogFormat::Json, "warn"));
        let s = LogSettings::resolve(None, None, Some("debug"), Some(&c));
        assert_eq!(s.filter, "debug");
        let s = LogSettings::resolve(Some(LogFormat::Text), Some("error"), Some("debug"), Some(&c));
        assert_eq!((s.format, s.filter.as_str()), (LogFormat::Text, "error"));
        let s = LogSettings::resolve(None, None, Some(""), None);
        assert_eq!((s.format, s.filter.as_str()), (LogFormat::Text, "info"));
        assert!(check_filter("info,cluster_proto=debug").is_ok());
        assert!(check_filter("info,lb=loud").is_err());
    }
}
