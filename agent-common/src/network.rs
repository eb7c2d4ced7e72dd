//! TCP: keys and values of the network maps.

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as `sock:inet_sock_set_state` reports them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const CLOSE: i32 = 7;
}

/// A remote TCP endpoint, plus the local process that owns the socket when a probe saw it in
/// process context (0 = not known).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// IPv4 addresses use the first 4 bytes, the rest stays zero.
    pub address: [u8; 16],
    pub family: u16,
    /// Remote port, host byte order.
    pub port: u16,
    pub tgid: u32,
}

impl PeerKey {
    /// The peer's IP address; IPv4-mapped IPv6 addresses are shown as IPv4.
    pub fn ip(&self) -> Option<core::net::IpAddr> {
        peer_address(self.family, &self.address)
    }
}

/// An address as the probes store it (family, 16 bytes) as an IP address; IPv4-mapped IPv6
/// addresses are shown as IPv4.
pub fn peer_address(family: u16, address: &[u8; 16]) -> Option<core::net::IpAddr> {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            address[0], address[1], address[2], address[3],
        ))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*address);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// Event counts per peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub retransmits: u64,
    pub connects_established: u64,
    /// Active opens that went from SYN_SENT straight to CLOSE (refused, timed out, reset).
    pub connects_failed: u64,
}

/// A connect in progress (SYN_SENT seen, ESTABLISHED or CLOSE not yet).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectStart {
    pub started_ns: u64,
    pub tgid: u32,
    pub _padding: u32,
}
