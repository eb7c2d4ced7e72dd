//! Budget state between runs: one JSON file under the state directory, written atomically.
use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;

use super::BudgetState;

/// File under the state directory holding every budget's state between runs.
pub const BUDGET_STATE_FILE: &str = "budget-state.json";

/// Reads the saved budget states; a missing file is a first start, a damaged one is logged
/// and replaced (the agent must start either way).
pub fn load_budget_states(state_dir: &Path) -> BTreeMap<String, BudgetState> {
    let path = state_dir.join(BUDGET_STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(
                "ignoring the damaged budget state {} ({error}); budgets start afresh",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(error) => {
            tracing::warn!(
                "cannot read the budget state {} ({error}); budgets start afresh",
                path.display()
            );
            BTreeMap::new()
        }
    }
}

/// Writes the budget states atomically (temp file, then rename).
pub fn save_budget_states(
    state_dir: &Path,
    states: &BTreeMap<String, BudgetState>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join(BUDGET_STATE_FILE);
    crate::files::write_atomically(&path, &serde_json::to_vec_pretty(states)?, Some(0o600))
        .with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("envelope-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn budget_state_round_trips_and_a_damaged_file_starts_afresh() {
        let dir = scratch("state");
        assert!(load_budget_states(&dir).is_empty());
        let mut states = BTreeMap::new();
        states.insert(
            "p95".to_string(),
            BudgetState {
                history: [(10, false), (20, true)].into(),
                firing_since_s: Some(10),
                breaches: 3,
                bad_windows: 1,
                good_windows: 1,
                ..BudgetState::default()
            },
        );
        save_budget_states(&dir, &states).unwrap();
        assert_eq!(load_budget_states(&dir), states);
        std::fs::write(dir.join(BUDGET_STATE_FILE), b"{ not json").unwrap();
        assert!(load_budget_states(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
