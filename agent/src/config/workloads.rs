//! Workload match rules, compiled: which configured workload a process belongs to.
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::model::process::container_id;

/// What a matcher knows about a process.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts<'a> {
    pub name: &'a str,
    pub executable: Option<&'a str>,
    pub cgroup: Option<&'a str>,
}

/// Compiled match rules of one workload.
#[derive(Debug)]
pub(super) struct WorkloadMatcher {
    pub(super) name: String,
    pub(super) process: GlobSet,
    pub(super) executable: GlobSet,
    pub(super) cgroup_prefix: Vec<String>,
    pub(super) systemd_unit: Vec<String>,
    pub(super) container_id: Vec<String>,
}

/// Every configured workload, in file order.
#[derive(Debug, Default)]
pub struct WorkloadRules {
    pub(super) matchers: Vec<WorkloadMatcher>,
}

impl WorkloadRules {
    /// The first configured workload whose rules match the process.
    pub fn workload_of(&self, process: &ProcessFacts<'_>) -> Option<&str> {
        self.matchers
            .iter()
            .find(|m| m.matches(process))
            .map(|m| m.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.matchers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }
}

impl WorkloadMatcher {
    fn matches(&self, process: &ProcessFacts<'_>) -> bool {
        if self.process.is_match(process.name) {
            return true;
        }
        if process
            .executable
            .is_some_and(|exe| self.executable.is_match(exe))
        {
            return true;
        }
        let Some(cgroup) = process.cgroup else {
            return false;
        };
        self.cgroup_prefix
            .iter()
            .any(|prefix| cgroup.starts_with(prefix.as_str()))
            || cgroup
                .split('/')
                .any(|segment| self.systemd_unit.iter().any(|unit| unit == segment))
            || container_id(cgroup).is_some_and(|id| {
                self.container_id
                    .iter()
                    .any(|prefix| id.starts_with(prefix.as_str()))
            })
    }
}

/// Compiles globs; on a bad one, the pattern and why.
pub(super) fn glob_set<'a>(
    patterns: impl IntoIterator<Item = &'a str>,
) -> Result<GlobSet, (String, String)> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob =
            Glob::new(pattern).map_err(|error| (pattern.to_string(), error.kind().to_string()))?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|error| (String::new(), error.to_string()))
}
