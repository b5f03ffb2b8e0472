//! Client-facing listeners: accepting, capping connections, serving HTTP/1.1 and HTTP/2
//! on one socket, the connection-level timeouts, and the graceful drain.

mod conn_guard;
pub mod drain;
pub mod h1;
mod listener;
mod parking;
pub mod workers;

pub use crate::proxy::{ActivityGuard, ConnActivity};
pub use conn_guard::{ConnLimits, GuardedIo};
pub use listener::{BindError, ListenAddr, Listeners, bind_single, listen_set};
pub use workers::Workers;
