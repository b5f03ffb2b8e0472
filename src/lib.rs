//! balancer: a reverse-proxy HTTP load balancer.
//!
//! A request flows `server` (accept, connection timeouts, the HTTP/1 loop) -> `proxy`
//! (check, route, admit, forward with retries, respond, log) -> `balance` (pick) ->
//! `backend` (pooled connections, health). What it reads comes from one
//! `runtime::Runtime` snapshot, compiled by `runtime::build` from a `config::Config`,
//! which `config::load` makes from the TOML file and the command-line overrides. `app`
//! wires these together; `main.rs` only parses flags. Modules depend on those below them
//! only (`tests/layering.rs`).
//!
//! Public: what the binary, the benches and the fuzz targets use.
#![deny(unsafe_code)]

pub(crate) mod admin;
pub mod app;
pub mod backend;
pub mod balance;
pub mod cache;
pub mod cli;
pub mod config;
pub mod diff;
pub(crate) mod discovery;
pub(crate) mod host;
pub mod http1;
pub mod limit;
pub mod logging;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod otlp;
pub mod path;
pub mod proxy;
pub(crate) mod reload;
pub mod runtime;
pub mod server;
pub(crate) mod timer;
pub(crate) mod tls;
pub(crate) mod worker;
