//! Requests timed in the kernel (root only), against a keep-alive HTTP/1.1 server this test
//! runs and a client that times every request itself: server-side and client-side
//! percentiles, time to first byte of streamed (chunked) answers, exact counts, connection
//! churn, and the verdicts that depend on whether a request is outstanding.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use envelope::analysis::window::{ClientRequests, ServerRequests, WindowSummary};
use integration_tests::{
    VethPair, diagnose_json, exclusive_traffic, load_probes, root_or_skip, veth_tools_or_skip,
    window_since,
};

/// What the server answers: `GET /plain/<us>` after `us` microseconds in one write;
/// `GET /stream/<us>` the headers and a first chunk after `us`, then four chunks 3 ms apart
/// (each its own write, as a server streaming tokens does), then the last chunk.
fn serve_connection(mut stream: TcpStream) {
    stream.set_nodelay(true).unwrap();
    let mut pending = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buffer[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        pending.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/plain/0");
        let (kind, micros) = path.trim_start_matches('/').split_once('/').unwrap();
        std::thread::sleep(Duration::from_micros(micros.parse().unwrap()));
        if kind == "stream" {
            let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            first.extend_from_slice(b"5\r\ntoken\r\n");
            stream.write_all(&first).unwrap();
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(3));
                stream.write_all(b"5\r\ntoken\r\n").unwrap();
            }
            stream.write_all(b"0\r\n\r\n").unwrap();
        } else {
            let body = [b'x'; 200];
            let mut response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            response.extend_from_slice(&body);
            stream.write_all(&response).unwrap();
        }
    }
}

/// A thread-per-connection HTTP/1.1 server on `address` (port 0: any); returns its address.
fn spawn_server(address: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(address).expect("bind");
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_connection(stream));
        }
    });
    address
}

/// One request's timing as the client saw it: to the first response byte and to the last.
struct ClientTiming {
    first_byte_ms: f64,
    total_ms: f64,
}

/// Sends `paths` one after another on one keep-alive connection, timing each from the
/// request's write to the response's first and last byte.
fn client(server: SocketAddr, paths: &[String]) -> Vec<ClientTiming> {
    let mut stream = TcpStream::connect(server).expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut timings = Vec::new();
    let mut buffer = [0u8; 4096];
    for path in paths {
        let started = Instant::now();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        let mut response = Vec::new();
        let mut first_byte = None;
        loop {
            let n = stream.read(&mut buffer).expect("response");
            assert!(n > 0, "the server closed mid-response");
            first_byte.get_or_insert_with(|| started.elapsed());
            response.extend_from_slice(&buffer[..n]);
            let complete = if path.starts_with("/stream") {
                response.ends_with(b"0\r\n\r\n")
            } else {
                response.len() >= 200 && response.ends_with(&[b'x'; 200][..])
            };
            if complete {
                break;
            }
        }
        timings.push(ClientTiming {
            first_byte_ms: first_byte.unwrap().as_secs_f64() * 1e3,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        });
    }
    timings
}

/// Delays spread evenly (deterministic pseudo-random) between 2 and 40 ms: smooth
/// percentiles, not cliffs between a few fixed values.
fn request_paths(count: usize, streamed_every: usize) -> Vec<String> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..count)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let micros = 2_000 + (state >> 33) % 38_000;
            let kind = if i % streamed_every == 0 {
                "stream"
            } else {
                "plain"
            };
            format!("/{kind}/{micros}")
        })
        .collect()
}

/// The real probes, when they time requests here (BTF socket probes); None, with the
/// reason printed, where they do not.
fn probes_timing_requests() -> Option<integration_tests::ExclusiveProbes> {
    let probes = load_probes();
    if !probes.requests_timed() {
        eprintln!("skipped: the socket probes are classic tracepoints here (no kernel BTF)");
        return None;
    }
    Some(probes)
}

/// This process's row for the requests it served on `server`'s port.
fn served_row(summary: &WindowSummary, server: SocketAddr) -> &ServerRequests {
    let me = std::process::id();
    summary
        .requests
        .servers
        .iter()
        .find(|s| s.pid == me && s.port == server.port())
        .unwrap_or_else(|| panic!("no server row for {server}: {:#?}", summary.requests))
}

/// This process's row for the requests it made to `server`.
fn client_row(summary: &WindowSummary, server: SocketAddr) -> &ClientRequests {
    let me = std::process::id();
    summary
        .requests
        .clients
        .iter()
        .find(|c| c.pid == me && c.peer == server.to_string())
        .unwrap_or_else(|| panic!("no client row for {server}: {:#?}", summary.requests))
}

/// Nearest-rank percentile of the client's own times.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn within(label: &str, measured: Option<f64>, truth: f64, tolerance: f64) {
    let measured = measured.unwrap_or_else(|| panic!("{label}: no value"));
    assert!(
        (measured - truth).abs() <= truth * tolerance,
        "{label}: kernel {measured:.3} ms, client {truth:.3} ms (more than {:.0}% apart)",
        tolerance * 100.0
    );
}

#[test]
fn keep_alive_requests_are_timed_like_the_client_times_them() {
    if !root_or_skip("request timing") {
        return;
    }
    let Some(probes) = probes_timing_requests() else {
        return;
    };
    let server = spawn_server("127.0.0.1:0".parse().unwrap());
    let paths = request_paths(240, 4);
    let before = probes.snapshot().unwrap();
    let timings = client(server, &paths);
    // The client closed its connection: the server's read of the end closes the last request.
    std::thread::sleep(Duration::from_millis(100));
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(1));

    let served = served_row(&summary, server);
    let made = client_row(&summary, server);
    let total: Vec<f64> = timings.iter().map(|t| t.total_ms).collect();
    let first: Vec<f64> = timings.iter().map(|t| t.first_byte_ms).collect();
    for (side, figures) in [("server", &served.figures), ("client", &made.figures)] {
        assert_eq!(figures.requests, paths.len() as u64, "{side}: {figures:#?}");
        assert_eq!(figures.untimed, 0, "{side}: {figures:#?}");
        assert_eq!(figures.connections, 1, "{side}: {figures:#?}");
        assert_eq!(
            figures.multiplexed_connections, 0,
            "{side}: HTTP/1.1 taken for HTTP/2"
        );
        for (q, measured) in [
            (0.50, figures.p50_ms),
            (0.95, figures.p95_ms),
            (0.99, figures.p99_ms),
        ] {
            within(
                &format!("{side} P{}", q * 100.0),
                measured,
                percentile(&total, q),
                0.10,
            );
        }
        within(
            &format!("{side} first byte P95"),
            figures.first_byte_p95_ms,
            percentile(&first, 0.95),
            0.10,
        );
    }
    // Loopback's round trip is microseconds, whatever the smoothed RTT says.
    assert!(
        made.path_rtt_ms.is_some_and(|rtt| rtt < 1.0),
        "path RTT {:?}, smoothed RTT P95 {:?}",
        made.path_rtt_ms,
        made.rtt_p95_ms
    );
    // Bytes: what the server received is what the client sent, and the other way round.
    assert_eq!(served.figures.bytes_in, made.figures.bytes_out);
    assert_eq!(served.figures.bytes_out, made.figures.bytes_in);
    let request_bytes: usize = paths
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1\r\nHost: test\r\n\r\n").len())
        .sum();
    assert_eq!(served.figures.bytes_in, request_bytes as u64);
}

/// Connection churn: every short connection is one request, counted exactly, and closed
/// sockets leave the socket table.
#[test]
fn short_connections_are_each_one_request() {
    if !root_or_skip("request timing with short connections") {
        return;
    }
    let Some(probes) = probes_timing_requests() else {
        return;
    };
    let server = spawn_server("127.0.0.1:0".parse().unwrap());
    let before = probes.snapshot().unwrap();
    let connections = 2000;
    let started = Instant::now();
    for _ in 0..connections {
        let timings = client(server, &["/plain/0".to_string()]);
        assert_eq!(timings.len(), 1);
    }
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let (_, summary) = window_since(&probes, &before, elapsed);
    let served = served_row(&summary, server);
    assert_eq!(served.figures.connections, connections);
    assert_eq!(served.figures.requests, connections);
    assert_eq!(served.figures.untimed, 0);
    let made = client_row(&summary, server);
    assert_eq!(made.figures.requests, connections);
    eprintln!(
        "{connections} connections in {elapsed:?} ({:.0}/s)",
        connections as f64 / elapsed.as_secs_f64()
    );
}

/// HTTP/2 (what gRPC runs on) interleaves requests on one connection: the kernel recognises
/// the connection from its first bytes and counts its exchanges as untimed, on both ends,
/// rather than timing them as if the requests took turns.
#[test]
fn http2_connections_are_recognised_and_their_requests_not_timed_as_turns() {
    if !root_or_skip("HTTP/2 recognition") {
        return;
    }
    let Some(probes) = probes_timing_requests() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let server = listener.local_addr().unwrap();
    // The server answers `/<ms>` after that many milliseconds, each stream on its own task.
    runtime.spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(socket).await.unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            tokio::spawn(async move {
                let ms: u64 = request.uri().path()[1..].parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let mut body = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                body.send_data(bytes::Bytes::from_static(b"answer"), true)
                    .unwrap();
            });
        }
    });
    let before = probes.snapshot().unwrap();
    let answered = runtime.block_on(async move {
        let socket = tokio::net::TcpStream::connect(server).await.unwrap();
        let (client, connection) = h2::client::handshake(socket).await.unwrap();
        tokio::spawn(connection);
        let mut answered = 0;
        // Three rounds of ten requests in flight at once, 10-55 ms each.
        for _ in 0..3 {
            let requests: Vec<_> = (0..10u64)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let mut client = client.ready().await.unwrap();
                        let request = http::Request::get(format!("http://test/{}", 10 + 5 * i))
                            .body(())
                            .unwrap();
                        let (response, _) = client.send_request(request, true).unwrap();
                        let mut body = response.await.unwrap().into_body();
                        while let Some(chunk) = body.data().await {
                            let chunk = chunk.unwrap();
                            body.flow_control().release_capacity(chunk.len()).unwrap();
                        }
                    })
                })
                .collect();
            for request in requests {
                request.await.unwrap();
                answered += 1;
            }
        }
        answered
    });
    assert_eq!(answered, 30);
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(1));
    let served = served_row(&summary, server);
    let made = client_row(&summary, server);
    for (side, figures) in [("server", &served.figures), ("client", &made.figures)] {
        assert_eq!(figures.multiplexed_connections, 1, "{side}: {figures:#?}");
        assert_eq!(figures.connections, 1, "{side}: {figures:#?}");
        assert_eq!(
            figures.requests, 0,
            "{side}: nothing timed as turns: {figures:#?}"
        );
        assert_eq!(figures.p95_ms, None, "{side}: {figures:#?}");
        assert!(
            figures.untimed >= 1,
            "{side}: exchanges counted: {figures:#?}"
        );
    }
    runtime.shutdown_background();
}

/// Through a veth pair with a queueing delay, the client's response time includes the
/// round trips and the server's does not; both agree with what each side can know.
#[test]
fn through_a_delayed_link_the_client_sees_the_round_trips_and_the_server_does_not() {
    if !veth_tools_or_skip("request timing over veth") {
        return;
    }
    let Some(probes) = probes_timing_requests() else {
        return;
    };
    // Requests leave the client through a 2 Mbit/s token bucket: each waits for its turn
    // on the link, which the client's time includes and the server's cannot.
    let pair = VethPair::create("2mbit", "50ms");
    let server_address = SocketAddrV4::new(pair.server_address, 5300);
    let (ready_sender, ready) = std::sync::mpsc::channel();
    let _server = VethPair::in_namespace(&pair.server_namespace, move || {
        let address = spawn_server(SocketAddr::V4(server_address));
        ready_sender.send(address).unwrap();
        std::thread::park();
    });
    let server = ready.recv().unwrap();
    let paths = request_paths(120, 3);
    let before = probes.snapshot().unwrap();
    let timings = VethPair::in_namespace(&pair.client_namespace, move || client(server, &paths))
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (_, summary) = window_since(&probes, &before, Duration::from_secs(1));
    let made = client_row(&summary, server);
    let served = served_row(&summary, server);
    let total: Vec<f64> = timings.iter().map(|t| t.total_ms).collect();
    for (q, measured) in [
        (0.50, made.figures.p50_ms),
        (0.95, made.figures.p95_ms),
        (0.99, made.figures.p99_ms),
    ] {
        within(
            &format!("client P{}", q * 100.0),
            measured,
            percentile(&total, q),
            0.10,
        );
    }
    assert_eq!(made.figures.requests, 120);
    assert_eq!(served.figures.requests, 120);
    assert!(
        made.rtt_p95_ms.is_some(),
        "the RTT beside the response time"
    );
    let path_rtt = made.path_rtt_ms.expect("the path's round trip");
    assert!(
        path_rtt > 0.0 && path_rtt < made.figures.p50_ms.unwrap(),
        "path RTT {path_rtt} ms against a P50 of {:?}",
        made.figures.p50_ms
    );
    // The server's time leaves the network out: never more than the client's.
    assert!(
        served.figures.p50_ms.unwrap() <= made.figures.p50_ms.unwrap(),
        "server {:?} vs client {:?}",
        served.figures,
        made.figures
    );
}

/// An event-loop server (tokio: epoll, like asyncio/uvicorn) answering one request every
/// 200 ms is idle between them, not waiting on the network.
#[test]
fn an_event_loop_server_with_light_traffic_has_no_bottleneck() {
    if !root_or_skip("idle event-loop server") {
        return;
    }
    // The verdict is about this whole process: no other test's traffic in it meanwhile.
    let _alone = exclusive_traffic();
    integration_tests::envelope_binary();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        runtime.block_on(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut buffer = [0u8; 64];
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                stream.write_all(b"pong").await.unwrap();
            }
        })
    });
    // The client is another process (bash's /dev/tcp), so this process is only the server.
    let mut client = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{}; for i in $(seq 30); do printf ping >&3; \
             read -r -n 4 reply <&3; sleep 0.2; done",
            address.port()
        ))
        .spawn()
        .expect("bash");
    std::thread::sleep(Duration::from_millis(300));
    let me = std::process::id().to_string();
    let (code, report) = diagnose_json(4, &["--pid", &me], &[]);
    assert!(client.wait().unwrap().success());
    server.join().unwrap();
    if report["requests"]["timed"] != true {
        eprintln!("skipped: requests are not timed here (no BTF socket probes)");
        return;
    }
    let this = &report["workloads"][0];
    assert!(
        this["time"]["network"]
            .as_f64()
            .is_some_and(|share| share < 0.05),
        "an event loop between requests is not waiting on the network: {this:#}\n{:#}",
        report["requests"]
    );
    assert_eq!(this["bottleneck"], "none", "{this:#}");
    assert_eq!(code, 0, "no bottleneck");
    // The requests themselves are there: ~20 in 4 s on the server's port.
    let served = report["requests"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["port"] == address.port())
        .unwrap_or_else(|| panic!("{:#}", report["requests"]));
    let count = served["requests"].as_u64().unwrap();
    assert!((17..=21).contains(&count), "{served:#}");
}

/// A client waiting on an upstream that takes 300 ms over a fast link waits on the
/// network (on a response), and the evidence says the upstream is slow, not the network.
#[test]
fn a_client_waiting_on_a_slow_upstream_is_told_apart_from_a_slow_network() {
    if !root_or_skip("slow upstream") {
        return;
    }
    // The verdict is about this whole process: no other test's traffic in it meanwhile.
    let _alone = exclusive_traffic();
    integration_tests::envelope_binary();
    let upstream = spawn_server("127.0.0.1:0".parse().unwrap());
    let caller = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut count = 0;
        while Instant::now() < deadline {
            client(upstream, &["/plain/300000".to_string()]);
            count += 1;
        }
        count
    });
    std::thread::sleep(Duration::from_millis(300));
    let me = std::process::id().to_string();
    let (code, report) = diagnose_json(4, &["--pid", &me], &[]);
    caller.join().unwrap();
    if report["requests"]["timed"] != true {
        eprintln!("skipped: requests are not timed here (no BTF socket probes)");
        return;
    }
    let this = &report["workloads"][0];
    assert_eq!(this["bottleneck"], "network", "{this:#}");
    assert_eq!(code, 3);
    let upstream_text = upstream.to_string();
    let evidence: Vec<&str> = this["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    let line = evidence
        .iter()
        .find(|e| e.starts_with(&format!("upstream {upstream_text} answers")))
        .unwrap_or_else(|| panic!("no upstream evidence: {evidence:#?}"));
    assert!(line.ends_with("a slow upstream"), "{line}");
    let made = report["requests"]["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"] == upstream_text.as_str())
        .unwrap_or_else(|| panic!("{:#}", report["requests"]));
    let p95 = made["p95_ms"].as_f64().unwrap();
    assert!((290.0..330.0).contains(&p95), "{made:#}");
}
