//! A small authoritative DNS server on 127.0.0.1 whose answers the test sets, for the
//! DNS discovery tests. UDP and TCP on the same port (long answers go over TCP). The wire
//! format is hickory-proto's; what to answer is the test's: addresses, SERVFAIL, silence
//! (the client times out), or an answer with no address.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// What the server answers for a name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These addresses (A for the IPv4 ones, AAAA for the IPv6 ones), TTL 1 s.
    Addresses(Vec<IpAddr>),
    ServFail,
    /// No reply at all: the client's lookup times out.
    Silence,
    /// NOERROR with no record.
    Empty,
}

type Zone = Arc<Mutex<HashMap<String, Answer>>>;

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Zone,
    /// Queries received so far.
    pub queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    /// Starts on a free port of 127.0.0.1; a name not set gets NXDOMAIN.
    pub async fn start() -> DnsServer {
        // A free UDP port may be taken for TCP (by another test): then another port.
        let mut tries = 0;
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(_) if tries < 50 => tries += 1,
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        };
        let zone: Zone = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let (z, q) = (zone.clone(), queries.clone());
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else { return };
                q.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = answer(&z, &buf[..n], true) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        let (z, q) = (zone.clone(), queries.clone());
        let tcp_task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else { return };
                let (z, q) = (z.clone(), q.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok(len) = s.read_u16().await else { return };
                        let mut query = vec![0u8; len as usize];
                        if s.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        q.fetch_add(1, Ordering::SeqCst);
                        let Some(reply) = answer(&z, &query, false) else { continue };
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        if s.write_all(&framed).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DnsServer { addr, zone, queries, tasks: vec![udp_task, tcp_task] }
    }

    /// From now on, `name` is answered with `answer`.
    pub fn set(&self, name: &str, answer: Answer) {
        self.zone.lock().unwrap().insert(name.trim_end_matches('.').to_ascii_lowercase(), answer);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// The reply to one query, `None` for silence. Over UDP, an answer too long for 512 bytes
/// is truncated (TC set, no records), so the client asks again over TCP.
fn answer(zone: &Zone, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let q = query.queries().first()?.clone();
    let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    // A response to `query` that repeats its question, with no record yet.
    let response_to = || {
        let mut m = Message::new();
        m.set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_authoritative(true)
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .add_query(q.clone());
        m
    };
    let mut reply = response_to();
    let found = zone.lock().unwrap().get(&name).cloned();
    match found {
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(Answer::Silence) => return None,
        Some(Answer::ServFail) => {
            reply.set_response_code(ResponseCode::ServFail);
        }
        Some(Answer::Empty) => {}
        Some(Answer::Addresses(addrs)) => {
            let records = addrs.iter().filter_map(|ip| match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            });
            for rdata in records {
                reply.add_answer(Record::from_rdata(q.name().clone(), 1, rdata));
            }
        }
    }
    let bytes = reply.to_vec().ok()?;
    if udp && bytes.len() > 512 {
        return response_to().set_truncated(true).to_vec().ok();
    }
    Some(bytes)
}
