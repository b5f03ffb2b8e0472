//! balancer: a reverse-proxy HTTP load balancer.
//!
//! A request flows `server` (accept, connection timeouts) -> `proxy` (route, pick,
//! rewrite, forward with retries, stream back, log) -> `backend` (pooled connections).
//! What it reads comes from one `runtime::Runtime` snapshot, compiled by `runtime::build`
//! from a `config::Config`, which `config::load` makes from the TOML file and the
//! command-line overrides. `app` wires these together; `main.rs` only parses flags.

pub mod admin;
pub mod app;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod host;
pub mod http1;
pub mod limit;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod timer;
pub mod tls;
pub mod worker;
