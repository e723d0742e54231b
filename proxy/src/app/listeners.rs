//! Each server's listeners: the address it is given and, for a wildcard or loopback one, the same
//! address of the other IP family, since `outrigger-proxy init` redirects both families to the
//! same ports and a family with no listener would refuse every redirected connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

pub struct Listeners(Vec<TcpListener>);

impl Listeners {
    pub fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<Self> {
        let mut listeners =
            vec![listen(addr).with_context(|| format!("binding the {what} listener on {addr}"))?];
        if let Some(other) = other_family(addr) {
            match listen(other) {
                Ok(listener) => listeners.push(listener),
                // A pod without that family has none of its traffic to take.
                Err(error) => tracing::warn!(%other, %error, "{what}: not listening on {other}"),
            }
        }
        Ok(Self(listeners))
    }

    /// The address asked for.
    pub fn addr(&self) -> SocketAddr {
        self.0[0].local_addr().expect("bound")
    }

    pub fn into_inner(self) -> Vec<TcpListener> {
        self.0
    }
}

/// `addr` in the other family, for the unspecified and loopback addresses at a fixed port (a port
/// chosen by the system would differ between the two).
fn other_family(addr: SocketAddr) -> Option<SocketAddr> {
    let ip: IpAddr = match addr.ip() {
        _ if addr.port() == 0 => return None,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED) => Ipv6Addr::UNSPECIFIED.into(),
        IpAddr::V4(Ipv4Addr::LOCALHOST) => Ipv6Addr::LOCALHOST.into(),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(Ipv6Addr::LOCALHOST) => Ipv4Addr::LOCALHOST.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, addr.port()))
}

/// Like `TcpListener::bind`, but an IPv6 socket takes IPv6 only: `[::]` next to `0.0.0.0` at one
/// port, and a redirected connection's original destination read in its own family.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_and_loopback_addresses_at_a_fixed_port_have_a_twin() {
        for (given, other) in [
            ("127.0.0.1:4140", Some("[::1]:4140")),
            ("0.0.0.0:4143", Some("[::]:4143")),
            ("[::]:4191", Some("0.0.0.0:4191")),
            ("127.0.0.1:0", None),
            ("10.0.0.1:4143", None),
        ] {
            assert_eq!(
                other_family(given.parse().unwrap()),
                other.map(|o| o.parse().unwrap()),
                "{given}"
            );
        }
    }
}
