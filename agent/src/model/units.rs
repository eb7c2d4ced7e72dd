//! Numbers with their units, as people read them (evidence sentences and the terminal report).

/// "1.23 ms", "850 us", "-" when missing.
pub fn format_ms(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(ms) if ms < 1.0 => format!("{:.0} us", ms * 1000.0),
        Some(ms) if ms < 100.0 => format!("{ms:.2} ms"),
        Some(ms) => format!("{ms:.0} ms"),
    }
}

/// Binary units: "4.0 KiB", "1.5 GiB".
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
