//! The `lb` daemon's pieces: configuration, admin API, metrics, demo and CLI client.

pub mod admin;
pub mod affinity;
pub mod certs;
pub mod chain;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod demo_fig2;
pub mod logging;
pub mod metrics;
pub mod metrics_listener;
pub mod notify;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod rules;
pub mod state;
pub mod steering;
