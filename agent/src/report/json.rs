//! The JSON form of a report: one object, schema documented in README.md.
use super::DiagnoseReport;

pub fn render(report: &DiagnoseReport) -> String {
    // Serialising plain structs of numbers and strings cannot fail.
    serde_json::to_string_pretty(report)
        .unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}
