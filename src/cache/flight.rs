//! Coalescing: concurrent misses on one key make one backend request. The first request
//! leads (it holds a [`Leader`]); the others wait on its outcome and then look again.
//!
//! The map is behind a std mutex held only to insert, find or remove one key, never
//! across an await. A waiter is a watch receiver: its client leaving drops only that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::tee::Tee;

/// What became of a leader's fetch, as its waiters learn it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The response is storable and arriving: read it from there as it comes
    /// ([`Tee::reader`]), or, when it is no variant for this request, go alone.
    Streaming(Arc<Tee>),
    /// The store has the response (stored or refreshed): look again.
    Stored,
    /// The response was not storable (or failed): each waiter goes to the backend itself.
    Pass,
    /// The leader's client left before the response was whole: one waiter leads anew.
    Abandoned,
}

type Slot = watch::Sender<Option<Outcome>>;

/// The keys being fetched now.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    inflight: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
}

/// A request's part in a fetch.
pub(crate) enum Role {
    Leader(Leader),
    Waiter(Waiter),
}

impl Flights {
    /// Leads the fetch of `key`, or waits for the one in progress.
    pub(crate) fn join(self: &Arc<Self>, key: &Arc<str>) -> Role {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(key) {
            return Role::Waiter(Waiter(slot.subscribe()));
        }
        let slot = Arc::new(watch::channel(None).0);
        map.insert(key.clone(), slot.clone());
        Role::Leader(Leader { flights: self.clone(), key: key.clone(), slot, done: false })
    }

    /// Leads the fetch of `key` if nobody does (a background revalidation).
    pub(crate) fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<Leader> {
        match self.join(key) {
            Role::Leader(l) => Some(l),
            Role::Waiter(_) => None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}

/// The request that fetches for the others. Dropped without [`Leader::finish`], it tells
/// them [`Outcome::Abandoned`].
#[derive(Debug)]
pub(crate) struct Leader {
    flights: Arc<Flights>,
    key: Arc<str>,
    slot: Arc<Slot>,
    done: bool,
}

impl Leader {
    /// Tells the waiters, without ending the fetch: a request that joins later learns it
    /// too (a streaming response that late joiners read from its start).
    pub(crate) fn share(&self, outcome: Outcome) {
        self.slot.send_replace(Some(outcome));
    }

    /// Ends the fetch with `outcome`: the key is free again, then the waiters are woken
    /// (after the store was updated, so a request that finds no flight finds the entry).
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut map = self.flights.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if map.get(&self.key).is_some_and(|s| Arc::ptr_eq(s, &self.slot)) {
                map.remove(&self.key);
            }
        }
        self.slot.send_replace(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.end(Outcome::Abandoned);
    }
}

/// A request waiting for a leader's outcome.
pub(crate) struct Waiter(watch::Receiver<Option<Outcome>>);

impl Waiter {
    /// The leader's outcome.
    pub(crate) async fn outcome(mut self) -> Outcome {
        match self.0.wait_for(Option::is_some).await {
            Ok(o) => o.clone().unwrap_or(Outcome::Abandoned),
            Err(_) => Outcome::Abandoned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_the_others_wait_and_a_dropped_leader_abandons() {
        let flights = Arc::new(Flights::default());
        let key: Arc<str> = "k".into();
        let Role::Leader(leader) = flights.join(&key) else { panic!("first leads") };
        let Role::Waiter(w1) = flights.join(&key) else { panic!("second waits") };
        let Role::Waiter(w2) = flights.join(&key) else { panic!("third waits") };
        drop(w2);
        leader.finish(Outcome::Stored);
        assert!(matches!(w1.outcome().await, Outcome::Stored));
        assert_eq!(flights.len(), 0);

        let Role::Leader(leader) = flights.join(&key) else { panic!("free again") };
        let Role::Waiter(w) = flights.join(&key) else { panic!("waits") };
        drop(leader);
        assert!(matches!(w.outcome().await, Outcome::Abandoned));
        assert!(flights.try_lead(&key).is_some());
    }
}
