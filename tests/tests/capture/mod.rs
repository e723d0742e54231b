//! What crosses the node's network interfaces between pods, as a packet capture on the node sees
//! it: a packet socket in the node's network namespace receives every frame of every interface
//! (each pod's veth, the bridge), and the TCP payloads between chosen addresses are kept.

use std::collections::HashSet;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// ETH_P_ALL: frames of every protocol.
const ALL_PROTOCOLS: u16 = 0x0003;
const ETHERNET_HEADER: usize = 14;
const IPV4: u16 = 0x0800;
const TCP: u8 = 6;

/// One TCP segment's payload: from where to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub from: (Ipv4Addr, u16),
    pub to: (Ipv4Addr, u16),
    pub payload: Vec<u8>,
}

/// A capture running until `stop`.
pub struct Capture {
    stopping: Arc<AtomicBool>,
    segments: Arc<Mutex<Vec<Segment>>>,
    thread: JoinHandle<()>,
}

impl Capture {
    /// Starts capturing the TCP segments with a payload between any two of `addresses`.
    pub fn start(addresses: &[IpAddr]) -> Result<Self, String> {
        let socket = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ALL_PROTOCOLS.to_be()))),
        )
        .map_err(|err| format!("a packet socket (root is needed): {err}"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|err| err.to_string())?;
        let watched: HashSet<Ipv4Addr> = addresses
            .iter()
            .filter_map(|address| match address {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        let stopping = Arc::new(AtomicBool::new(false));
        let segments = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stopping, segments) = (stopping.clone(), segments.clone());
            move || {
                let mut socket = socket;
                let mut frame = vec![0; 65536];
                while !stopping.load(Ordering::Relaxed) {
                    let Ok(len) = socket.read(&mut frame) else {
                        continue;
                    };
                    if let Some(segment) = tcp_segment(&frame[..len])
                        && watched.contains(&segment.from.0)
                        && watched.contains(&segment.to.0)
                    {
                        segments.lock().expect("capture lock").push(segment);
                    }
                }
            }
        });
        Ok(Self {
            stopping,
            segments,
            thread,
        })
    }

    /// Stops, and gives what was captured, in the order it was seen (a segment crossing the
    /// veth and the bridge is seen on each).
    pub fn stop(self) -> Vec<Segment> {
        self.stopping.store(true, Ordering::Relaxed);
        self.thread.join().expect("the capture thread");
        Arc::try_unwrap(self.segments)
            .expect("the thread is done")
            .into_inner()
            .expect("capture lock")
    }
}

/// The TCP payload of an Ethernet frame carrying IPv4, if it has one.
fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    if ethertype != IPV4 {
        return None;
    }
    let ip = frame.get(ETHERNET_HEADER..)?;
    let ip_header = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
    if *ip.get(9)? != TCP || ip_header < 20 || total > ip.len() {
        return None;
    }
    let address = |at: usize| -> Option<Ipv4Addr> {
        let octets: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(octets))
    };
    let tcp = ip.get(ip_header..total)?;
    let port = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(tcp.get(at..at + 2)?.try_into().ok()?))
    };
    let tcp_header = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(tcp_header..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Segment {
        from: (address(12)?, port(0)?),
        to: (address(16)?, port(2)?),
        payload: payload.to_vec(),
    })
}

#[test]
fn a_frame_s_tcp_payload_and_addresses_are_read_and_anything_else_is_not() {
    let mut frame = vec![0; 12];
    frame.extend([0x08, 0x00]);
    // IPv4, 20-byte header, total length 20 + 20 + 5, TCP, 10.0.0.1 -> 10.0.0.2.
    frame.extend([
        0x45, 0, 0, 45, 0, 0, 0, 0, 64, TCP, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    // TCP 40000 -> 7000, 20-byte header.
    let mut tcp = vec![0x9c, 0x40, 0x1b, 0x58];
    tcp.extend([0; 8]);
    tcp.extend([0x50, 0x18]);
    tcp.extend([0; 6]);
    frame.extend(tcp);
    frame.extend(b"hello");
    // Ethernet padding past the IP packet is not payload.
    frame.extend([0; 3]);
    assert_eq!(
        tcp_segment(&frame),
        Some(Segment {
            from: (Ipv4Addr::new(10, 0, 0, 1), 40000),
            to: (Ipv4Addr::new(10, 0, 0, 2), 7000),
            payload: b"hello".to_vec(),
        })
    );
    // An acknowledgement without payload, a frame cut short, and ARP are nothing.
    let mut ack = frame[..ETHERNET_HEADER + 40].to_vec();
    ack[ETHERNET_HEADER + 3] = 40;
    assert_eq!(tcp_segment(&ack), None);
    assert_eq!(tcp_segment(&frame[..ETHERNET_HEADER + 30]), None);
    let mut arp = frame.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(tcp_segment(&arp), None);
}
