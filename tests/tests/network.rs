//! Network probes against TCP traffic the test makes itself (root only): loopback over IPv4
//! and IPv6, a refused connect, and a veth pair between two namespaces with a real queueing
//! delay, checked against the kernel's own srtt as `ss -ti` reports it.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use integration_tests::{VethPair, load_probes, root_or_skip, veth_tools_or_skip, window_since};

/// Connects to a fresh listener on `ip` and does `round_trips` request/response exchanges.
/// Returns (server address, client's local address).
fn ping_pong(ip: std::net::IpAddr, round_trips: usize) -> (SocketAddr, SocketAddr) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind");
    let server_address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buffer = [0u8; 64];
        while stream.read_exact(&mut buffer).is_ok() {
            stream.write_all(&buffer).expect("echo");
        }
    });
    let mut client = TcpStream::connect(server_address).expect("connect");
    client.set_nodelay(true).unwrap();
    let client_address = client.local_addr().unwrap();
    let mut buffer = [7u8; 64];
    for _ in 0..round_trips {
        client.write_all(&buffer).expect("send");
        client.read_exact(&mut buffer).expect("receive");
    }
    drop(client);
    server.join().unwrap();
    (server_address, client_address)
}

fn check_loopback(ip: std::net::IpAddr, label: &str) {
    let probes = load_probes();
    let before = probes.snapshot().unwrap();
    let (server, client) = ping_pong(ip, 300);
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(1));
    let me = std::process::id();

    let to_server = summary
        .network
        .peers
        .iter()
        .find(|p| p.peer == server.to_string())
        .unwrap_or_else(|| panic!("{label}: no peer {server} in {:#?}", summary.network.peers));
    assert_eq!(to_server.connects, 1, "{label}: one connect to {server}");
    assert_eq!(to_server.connect_failures, 0);
    assert!(
        to_server.rtt_samples >= 100,
        "{label}: {} RTT samples",
        to_server.rtt_samples
    );
    let p50 = to_server.rtt_p50_ms.expect("rtt p50");
    assert!(
        p50 > 0.0 && p50 < 20.0,
        "{label}: loopback RTT p50 {p50} ms"
    );
    assert!(
        to_server.connect_p95_ms.is_some_and(|ms| ms < 100.0),
        "{label}: connect latency"
    );
    assert!(
        to_server.processes.iter().any(|p| p.pid == me),
        "{label}: connect owner is this process"
    );
    assert_eq!(to_server.retransmits, 0);

    // The accepted socket learns its owner from send/recv, which run in our context.
    let to_client = summary
        .network
        .peers
        .iter()
        .find(|p| p.peer == client.to_string())
        .expect("server side peer");
    assert!(to_client.rtt_samples > 0);
    assert!(
        to_client.processes.iter().any(|p| p.pid == me),
        "{label}: server socket owner"
    );
    assert_eq!(
        to_client.connects, 0,
        "{label}: the server side made no connect"
    );
}

#[test]
fn loopback_ipv4_rtt_connects_and_owners() {
    if root_or_skip("loopback_ipv4") {
        check_loopback(Ipv4Addr::LOCALHOST.into(), "IPv4");
    }
}

#[test]
fn loopback_ipv6_rtt_connects_and_owners() {
    if !root_or_skip("loopback_ipv6") {
        return;
    }
    if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
        eprintln!("skipping loopback_ipv6: this machine has no IPv6 loopback");
        return;
    }
    check_loopback(Ipv6Addr::LOCALHOST.into(), "IPv6");
}

#[test]
fn refused_connect_is_a_failed_connect() {
    if !root_or_skip("refused_connect") {
        return;
    }
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let probes = load_probes();
    let before = probes.snapshot().unwrap();
    assert!(
        TcpStream::connect(closed).is_err(),
        "connect to a closed port must fail"
    );
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(1));
    let peer = summary
        .network
        .peers
        .iter()
        .find(|p| p.peer == closed.to_string())
        .expect("refused peer listed");
    assert_eq!((peer.connects, peer.connect_failures), (0, 1));
    assert_eq!(peer.connect_p95_ms, None);
}

/// Bulk data through a token bucket (8 Mbit/s) with the receive window held at about 64 KiB:
/// the bucket's queue holds most of the window, so the sender's RTT sits at tens of
/// milliseconds. envelope's median must match `ss -ti`'s srtt sampled over the same time.
#[test]
fn veth_rtt_with_tbf_delay_matches_kernel_srtt() {
    if !veth_tools_or_skip("veth_rtt") {
        return;
    }
    let pair = VethPair::create("8mbit", "400ms");
    let server_address = SocketAddrV4::new(pair.server_address, 5201);
    let probes = load_probes();
    let at_load = probes.snapshot().unwrap();

    // A ~64 KiB receive buffer caps the window, so the flow settles instead of sawing.
    let server = pair.spawn_sink_server(server_address, Some(65536));

    // The first second is slow start overshooting into the queue; then the window settles.
    const WARM_UP: Duration = Duration::from_millis(1500);
    const MEASURED: Duration = Duration::from_secs(4);
    const SECONDS: u64 = 6;
    let client = VethPair::in_namespace(&pair.client_namespace, move || {
        let mut stream = TcpStream::connect(server_address).expect("connect across the veth");
        let chunk = vec![1u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(SECONDS);
        let mut sent = 0usize;
        while Instant::now() < deadline {
            stream.write_all(&chunk).expect("send");
            sent += chunk.len();
        }
        sent
    });

    // Sample the kernel's own srtt for the client socket over the same steady-state window
    // that envelope measures.
    std::thread::sleep(WARM_UP);
    let before = probes.snapshot().unwrap();
    let mut ss_samples = Vec::new();
    let sampling_started = Instant::now();
    // srtt saws between ~14 and ~28 ms here: every 20 ms (~150 samples, not ~38 at 100 ms)
    // so the reference median is not the noisy side (one CI run read 17.8 ms from 37 samples
    // where envelope's 365 read 20.0, and the next six runs agreed within 3%).
    while sampling_started.elapsed() < MEASURED {
        ss_samples.extend(VethPair::ss_rtt_ms(&pair.client_namespace, server_address));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, summary) = window_since(&probes, &before, sampling_started.elapsed());
    let (_, whole_run) = window_since(&probes, &at_load, Duration::from_secs(SECONDS));
    let sent = client.join().expect("client");
    let received = server.join().expect("server");
    assert!(sent > 0 && received > 0);
    let connects: u64 = whole_run
        .network
        .peers
        .iter()
        .filter(|p| p.peer == server_address.to_string())
        .map(|p| p.connects)
        .sum();
    assert_eq!(connects, 1, "one connect across the veth");

    let peer = summary
        .network
        .peers
        .iter()
        .find(|p| p.peer == server_address.to_string())
        .unwrap_or_else(|| panic!("no peer {server_address} in {:#?}", summary.network.peers));
    assert!(
        ss_samples.len() >= 10,
        "ss returned {} samples",
        ss_samples.len()
    );
    ss_samples.sort_by(f64::total_cmp);
    let ss_median = ss_samples[ss_samples.len() / 2];
    let envelope_p50 = peer.rtt_p50_ms.expect("rtt p50");
    eprintln!(
        "veth+tbf: ss srtt median {ss_median:.1} ms over {} samples (min {:.1}, max {:.1}); envelope P50 {envelope_p50:.1} ms P95 {:?} over {} samples",
        ss_samples.len(),
        ss_samples[0],
        ss_samples[ss_samples.len() - 1],
        peer.rtt_p95_ms,
        peer.rtt_samples
    );
    assert!(
        ss_median > 10.0,
        "the tbf queue should add tens of ms, ss says {ss_median} ms"
    );
    let error = (envelope_p50 - ss_median).abs() / ss_median;
    assert!(
        error <= 0.10,
        "RTT P50 {envelope_p50:.2} ms vs ss srtt median {ss_median:.2} ms ({:.1}%)",
        error * 100.0
    );
}

/// A token bucket with a tiny queue drops a bulk flow's excess: the kernel retransmits, and
/// envelope must count retransmits to that peer. The kernel counts segments (`ss`), the probe
/// counts retransmitted packets (a GSO packet holds several segments), so envelope's count is
/// at most the kernel's; both must be non-zero.
#[test]
fn drops_on_a_veth_show_up_as_retransmits() {
    if !veth_tools_or_skip("retransmits") {
        return;
    }
    let pair = VethPair::create("4mbit", "5ms");
    let server_address = SocketAddrV4::new(pair.server_address, 5202);
    let probes = load_probes();
    let before = probes.snapshot().unwrap();
    let server = pair.spawn_sink_server(server_address, None);
    let (done_sender, done) = std::sync::mpsc::channel::<()>();
    let (sent_sender, sent) = std::sync::mpsc::channel::<()>();
    let client = VethPair::in_namespace(&pair.client_namespace, move || {
        let mut stream = TcpStream::connect(server_address).expect("connect");
        let chunk = vec![3u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            stream.write_all(&chunk).expect("send");
        }
        sent_sender.send(()).unwrap();
        // Keep the socket open until the kernel's counters have been read.
        let _ = done.recv();
    });
    sent.recv().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let kernel_retransmits =
        integration_tests::ss_total_retransmits(&pair.client_namespace, server_address);
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(4));
    done_sender.send(()).unwrap();
    client.join().unwrap();
    server.join().unwrap();
    let peer = summary
        .network
        .peers
        .iter()
        .find(|p| p.peer == server_address.to_string())
        .expect("peer listed");
    eprintln!(
        "retransmits: envelope {} packets, kernel {kernel_retransmits} segments",
        peer.retransmits
    );
    assert!(
        kernel_retransmits > 0,
        "the tiny queue should have dropped something"
    );
    assert!(peer.retransmits > 0, "envelope saw no retransmit");
    assert!(
        peer.retransmits <= kernel_retransmits + 2,
        "envelope {} > kernel {kernel_retransmits}",
        peer.retransmits
    );
}
