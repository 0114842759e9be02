//! Putting a changed `[server.callers]`, `server.auth_token` and `[server.tls]` (renewed
//! certificates) in force while serving: on `SIGHUP`, and every `server.reload_interval_s`
//! when the configuration as it loads now (its file, the variables and flags, the token files,
//! a digest of the TLS files) differs from the last one loaded.
//!
//! Why both: an operator on a host sends a signal when an edit is done; in Kubernetes a
//! rotated Secret, a certificate cert-manager renewed or an edited ConfigMap reaches the pod's
//! mounted files and no process there is told, so the server looks. Looking is loading: a Kubernetes volume swaps its files by
//! renaming a symlink, which no single file's modification time shows, and loading a small
//! TOML file and a few tokens every few seconds costs nothing a server notices.

use std::time::Duration;

use anyhow::Result;
use tracing::{error, info};

use crate::callers::CallersChange;
use crate::config::Config;
use crate::server::Server;

/// What asked for a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP`: reload whatever the configuration is (the operator asked).
    Hangup,
    /// `server.reload_interval_s` passed: reload only what changed since the last look.
    Interval,
}

/// What a look did.
#[derive(Debug, PartialEq)]
pub enum Reload {
    /// The configuration loads as at the last look (or fails as then): nothing done, nothing
    /// logged again.
    Unchanged,
    /// The loaded callers are in force.
    Applied(CallersChange),
    /// The configuration did not load or was invalid: the callers in force stay, and the
    /// log and `s3net_config_last_reload_successful` say so.
    Refused,
}

/// Loads the configuration again when asked and hands a changed one to
/// [`Server::reload_callers`]. `load` is how the server was configured (`s3net serve`'s
/// file, variables and flags), called anew at each look.
pub struct Reloader<L> {
    load: L,
    /// What the last look loaded: the configuration, or why it did not load.
    last: std::result::Result<Config, String>,
}

impl<L: FnMut() -> Result<Config>> Reloader<L> {
    /// A reloader whose first look compares against `started`, the configuration in force.
    pub fn new(load: L, started: Config) -> Self {
        Reloader { load, last: Ok(started) }
    }

    /// Loads the configuration and, on `SIGHUP` or when it changed since the last look, puts
    /// its callers in force; a failure is logged once, not at every interval it persists.
    pub fn look(&mut self, server: &Server, trigger: Trigger) -> Reload {
        let loaded = (self.load)().map_err(|e| format!("{e:#}"));
        if trigger == Trigger::Interval && loaded == self.last {
            return Reload::Unchanged;
        }
        let outcome = match &loaded {
            Ok(cfg) => {
                if trigger == Trigger::Interval {
                    info!("the configuration changed: reloading [server.callers]");
                }
                server.reload_callers(cfg).map_err(|e| format!("{e:#}"))
            }
            Err(e) => {
                server.reload_refused();
                Err(e.clone())
            }
        };
        self.last = loaded;
        match outcome {
            Ok(change) => Reload::Applied(change),
            Err(e) => {
                match trigger {
                    Trigger::Hangup => error!("configuration not reloaded on SIGHUP: {e}"),
                    Trigger::Interval => error!("configuration changed but not reloaded: {e}; the callers in force stay"),
                }
                Reload::Refused
            }
        }
    }
}

/// `SIGHUP`s, caught from the moment this is made (before the server's warm-up: the signal's
/// default action would end the process). Never fires where there are no signals.
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Catches `SIGHUP` from now on (inside a Tokio runtime).
    pub fn catch() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// The next `SIGHUP`.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.signal {
            if s.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Looks at the configuration on each `SIGHUP` and every `interval` (none: on `SIGHUP` only),
/// until dropped.
pub async fn run<L: FnMut() -> Result<Config>>(server: &Server, mut reloader: Reloader<L>, mut hangups: Hangups, interval: Option<Duration>) {
    let mut ticks = interval.map(|p| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let trigger = tokio::select! {
            _ = hangups.next() => Trigger::Hangup,
            _ = async {
                match &mut ticks {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending().await,
                }
            } => Trigger::Interval,
        };
        reloader.look(server, trigger);
    }
}
