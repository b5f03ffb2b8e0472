//! A timer for a deadline that moves on every request but rarely fires (idle, head and
//! response timeouts): it is moved only when it fires before the current deadline or is
//! set later than it, which spares a timer-wheel update per request (a visible cost in the
//! profile).

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use tokio::time::{Instant, Sleep};

pub struct LazyTimer(Pin<Box<Sleep>>);

impl LazyTimer {
    pub fn new(deadline: Instant) -> LazyTimer {
        LazyTimer(Box::pin(tokio::time::sleep_until(deadline)))
    }

    /// Whether `deadline` has passed; if not, the task of `cx` is woken when it does.
    pub fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        if self.0.deadline() > deadline {
            self.0.as_mut().reset(deadline);
        }
        loop {
            if self.0.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.0.deadline() >= deadline {
                return true;
            }
            self.0.as_mut().reset(deadline);
        }
    }
}
