//! A response on its way into the cache, read as it arrives by every request that wants
//! it: the client of the request that fetched it and the waiters of its flight (SPEC 14
//! coalescing). The writing side, [`Fill`], is driven by a task of its own
//! (`proxy/cache.rs`), so a client that leaves cancels nothing for the others; the
//! response is stored once its body is whole.
//!
//! Up to `max_object` every chunk is kept: it is the entry to be, and a waiter that joins
//! late reads it from the start. Past it nothing will be stored: the flight ends (later
//! requests go to the backend themselves), the chunks every reader has taken are
//! dropped, and the fill waits for the slowest reader, as a proxied body waits for its
//! one client.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use super::{Cache, Leader, Outcome, Storable};

/// The shared part: the head, and the chunks received so far.
pub struct Tee {
    cache: Arc<Cache>,
    key: Arc<str>,
    /// The request whose fields the stored `Vary` is judged by.
    request: http::request::Parts,
    head: Storable,
    /// The backend's length, when it sent one.
    length: Option<u64>,
    state: Mutex<State>,
    /// Wakes the fill when a reader has taken a chunk or left (it waits for them only
    /// past `max_object`).
    moved: Notify,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee").field("key", &self.key).finish_non_exhaustive()
    }
}

struct State {
    chunks: VecDeque<Bytes>,
    /// The index, counted from the first chunk of the body, of `chunks[0]`.
    first: usize,
    received: u64,
    /// Every chunk is kept (the response is still to be stored).
    keeping: bool,
    end: Option<End>,
    /// Each reader's next chunk and its waker, by reader id; `None` once it left.
    readers: Vec<Option<Place>>,
}

enum End {
    Complete,
    Broken(Arc<str>),
}

struct Place {
    next: usize,
    waker: Option<Waker>,
}

/// The backend's response body broke off while it was being shared.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TeeBroken(Arc<str>);

impl Tee {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response's status and the fields a waiter's response carries (as stored:
    /// without per-connection fields or a length).
    pub(crate) fn head(&self) -> &Storable {
        &self.head
    }

    /// The backend's length, when it sent one.
    pub(crate) fn length(&self) -> Option<u64> {
        self.length
    }

    /// A reader from the first chunk; `None` once chunks have been dropped (past
    /// `max_object`): the request then goes to the backend itself.
    pub(crate) fn reader(self: &Arc<Self>) -> Option<Reader> {
        let mut state = self.state();
        if !state.keeping {
            return None;
        }
        let id = state.readers.len();
        state.readers.push(Some(Place { next: 0, waker: None }));
        Some(Reader { tee: self.clone(), id, taken: 0 })
    }

    /// Wakes every reader waiting for a chunk or the end.
    fn wake(state: &mut State) {
        for place in state.readers.iter_mut().flatten() {
            if let Some(w) = place.waker.take() {
                w.wake();
            }
        }
    }
}

/// The writing side of a [`Tee`], owned by the task that reads the backend. Dropped
/// before [`Fill::finish`] (the backend broke off), the readers get an error, nothing is
/// stored and its [`Leader`] tells the waiters that have not started to lead anew.
pub struct Fill {
    tee: Arc<Tee>,
    leader: Option<Leader>,
    finished: bool,
}

/// What [`Fill::push`] says to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Read,
    /// Nothing will be stored and nobody reads any more: stop reading the backend.
    Stop,
}

impl Fill {
    /// Starts sharing the response `head` for `key`: the waiters of `leader`'s flight are
    /// told to read it. Gives the reader for the request that fetched it.
    pub(crate) fn open(
        cache: Arc<Cache>,
        key: Arc<str>,
        request: http::request::Parts,
        head: Storable,
        leader: Option<Leader>,
        length: Option<u64>,
    ) -> (Fill, Reader) {
        let state = State {
            chunks: VecDeque::new(),
            first: 0,
            received: 0,
            keeping: true,
            end: None,
            readers: Vec::with_capacity(1),
        };
        let tee = Arc::new(Tee { cache, key, request, head, length, state: Mutex::new(state), moved: Notify::new() });
        let reader = tee.reader().expect("a new tee keeps its chunks");
        if let Some(l) = &leader {
            l.share(Outcome::Streaming(tee.clone()));
        }
        (Fill { tee, leader, finished: false }, reader)
    }

    /// One chunk of the body, for every reader. Past `max_object` nothing will be stored:
    /// this waits until every reader has taken what it had.
    pub async fn push(&mut self, chunk: Bytes) -> Next {
        let tee = &*self.tee;
        {
            let mut state = tee.state();
            state.received += chunk.len() as u64;
            if state.keeping && state.received > tee.cache.config.max_object {
                state.keeping = false;
                tracing::debug!(cache = %tee.cache.name, key = %tee.key, "response larger than max_object: not stored");
                if let Some(l) = self.leader.take() {
                    l.finish(Outcome::Pass);
                }
            }
            state.chunks.push_back(chunk);
            Tee::wake(&mut state);
        }
        loop {
            // Registered before looking, so that a reader moving on in between is not missed.
            let moved = tee.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            {
                let mut state = tee.state();
                if state.keeping {
                    return Next::Read;
                }
                let end = state.first + state.chunks.len();
                let slowest = state.readers.iter().flatten().map(|p| p.next).min();
                let Some(slowest) = slowest else { return Next::Stop };
                while state.first < slowest {
                    state.chunks.pop_front();
                    state.first += 1;
                }
                if slowest == end {
                    return Next::Read;
                }
            }
            moved.await;
        }
    }

    /// The body ended cleanly: the response is stored (when it was kept whole), then the
    /// waiters and readers are told.
    pub fn finish(mut self) {
        self.finished = true;
        let tee = &*self.tee;
        let mut state = tee.state();
        if state.keeping {
            let mut body = BytesMut::with_capacity(state.received as usize);
            for c in &state.chunks {
                body.extend_from_slice(c);
            }
            let entry = tee.head.clone().into_entry(body.freeze(), SystemTime::now());
            tee.cache.insert(&tee.key, &tee.request, entry);
        }
        state.end = Some(End::Complete);
        Tee::wake(&mut state);
        drop(state);
        if let Some(l) = self.leader.take() {
            l.finish(Outcome::Stored);
        }
    }

    /// The body broke off with `error`: the readers get it.
    pub fn broke(mut self, error: &dyn std::fmt::Display) {
        self.end(End::Broken(error.to_string().into()));
        self.finished = true;
    }

    fn end(&mut self, end: End) {
        let mut state = self.tee.state();
        state.end.get_or_insert(end);
        Tee::wake(&mut state);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.finished {
            self.end(End::Broken("the backend's response was cut short".into()));
        }
    }
}

/// One request's view of a shared response: its body, from the first chunk.
#[derive(Debug)]
pub struct Reader {
    tee: Arc<Tee>,
    id: usize,
    taken: u64,
}

#[cfg(test)]
impl Reader {
    /// The response it reads.
    pub(crate) fn tee(&self) -> &Arc<Tee> {
        &self.tee
    }
}

impl Body for Reader {
    type Data = Bytes;
    type Error = TeeBroken;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, TeeBroken>>> {
        let this = &mut *self;
        let tee = &*this.tee;
        let mut guard = tee.state();
        let state = &mut *guard;
        let Some(place) = state.readers.get_mut(this.id).and_then(Option::as_mut) else {
            return Poll::Ready(None);
        };
        if place.next < state.first + state.chunks.len() {
            let chunk = state.chunks[place.next - state.first].clone();
            place.next += 1;
            this.taken += chunk.len() as u64;
            if !state.keeping {
                tee.moved.notify_one();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match &state.end {
            Some(End::Complete) => Poll::Ready(None),
            Some(End::Broken(why)) => Poll::Ready(Some(Err(TeeBroken(why.clone())))),
            None => {
                place.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.tee.state();
        let next = state.readers.get(self.id).and_then(Option::as_ref).map_or(usize::MAX, |p| p.next);
        matches!(state.end, Some(End::Complete)) && next >= state.first + state.chunks.len()
    }

    fn size_hint(&self) -> SizeHint {
        match self.tee.length {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.taken)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut state = self.tee.state();
        if let Some(place) = state.readers.get_mut(self.id) {
            *place = None;
        }
        let keeping = state.keeping;
        drop(state);
        if !keeping {
            self.tee.moved.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Role;
    use http::{HeaderMap, StatusCode};
    use http_body_util::BodyExt;

    fn cache(max_object: u64) -> Arc<Cache> {
        let config = crate::config::CacheConfig { max_size: 1 << 20, max_object };
        Arc::new(Cache::new("t", config))
    }

    fn get() -> http::request::Parts {
        http::Request::get("/a").body(()).unwrap().into_parts().0
    }

    fn storable() -> Storable {
        let mut fields = HeaderMap::new();
        fields.insert(http::header::CACHE_CONTROL, "max-age=60".parse().unwrap());
        Storable::judge(&get(), StatusCode::OK, &fields, SystemTime::now()).unwrap()
    }

    #[tokio::test]
    async fn waiters_read_as_it_arrives_and_the_whole_body_is_stored_though_the_first_reader_left() {
        let cache = cache(1 << 20);
        let key: Arc<str> = "h /a".into();
        let Role::Leader(leader) = cache.join(&key) else { panic!("leads") };
        let Role::Waiter(waiter) = cache.join(&key) else { panic!("waits") };
        let (mut fill, first) = Fill::open(cache.clone(), key.clone(), get(), storable(), Some(leader), None);
        assert_eq!(fill.push(Bytes::from_static(b"one ")).await, Next::Read);
        let Outcome::Streaming(tee) = waiter.outcome().await else { panic!("told to read") };
        let mut second = tee.reader().unwrap();
        let frame = second.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one ", "before the body is whole");
        drop(first);
        assert_eq!(fill.push(Bytes::from_static(b"two")).await, Next::Read);
        fill.finish();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "two");
        let late = tee.reader().unwrap();
        assert_eq!(late.collect().await.unwrap().to_bytes(), "one two", "a late reader starts at the start");
        let super::super::Found::Fresh(entry) = cache.lookup(&key, &get(), SystemTime::now()) else { panic!("stored") };
        assert_eq!(entry.body, "one two");
    }

    #[tokio::test]
    async fn past_max_object_chunks_are_dropped_and_the_fill_stops_when_nobody_reads() {
        let cache = cache(4);
        let key: Arc<str> = "h /big".into();
        let (mut fill, mut reader) = Fill::open(cache.clone(), key.clone(), get(), storable(), None, None);
        assert_eq!(fill.push(Bytes::from_static(b"abc")).await, Next::Read);
        let tee = reader.tee().clone();
        // Past max_object the fill waits until the reader has taken what it had.
        let pushing = tokio::spawn(async move {
            let next = fill.push(Bytes::from_static(b"defg")).await;
            (fill, next)
        });
        assert_eq!(reader.frame().await.unwrap().unwrap().into_data().unwrap(), "abc");
        assert_eq!(reader.frame().await.unwrap().unwrap().into_data().unwrap(), "defg");
        let (mut fill, next) = pushing.await.unwrap();
        assert_eq!(next, Next::Read);
        assert!(tee.reader().is_none(), "the start is gone");
        drop(reader);
        assert_eq!(fill.push(Bytes::from_static(b"h")).await, Next::Stop);
        drop(fill);
        assert!(matches!(cache.lookup(&key, &get(), SystemTime::now()), super::super::Found::Miss));
    }

    #[tokio::test]
    async fn a_broken_body_reaches_every_reader_as_an_error() {
        let cache = cache(1 << 20);
        let (mut fill, reader) = Fill::open(cache, "h /b".into(), get(), storable(), None, None);
        fill.push(Bytes::from_static(b"x")).await;
        fill.broke(&"reset");
        let err = reader.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "reset");
    }
}
