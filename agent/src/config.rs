//! The configuration file (TOML). Today it names workloads; budgets join it later.
//!
//! ```toml
//! [[workload]]
//! name = "trainer"
//! # A process belongs to the first workload with a rule that matches it.
//! process = ["python*", "torchrun"]       # globs on the process name
//! executable = ["/opt/trainer/bin/*"]     # globs on the executable's path
//! cgroup_prefix = ["/system.slice/trainer.service"]
//! systemd_unit = ["trainer.service"]
//! container_id = ["3f4e5d6c7b8a"]         # prefixes of container ids
//! ```
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default)]
    pub process: Vec<String>,
    #[serde(default)]
    pub executable: Vec<String>,
    #[serde(default)]
    pub cgroup_prefix: Vec<String>,
    #[serde(default)]
    pub systemd_unit: Vec<String>,
    #[serde(default)]
    pub container_id: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: workload {workload:?}: bad glob {pattern:?}: {message}")]
    Glob {
        path: String,
        workload: String,
        pattern: String,
        message: String,
    },
    #[error(
        "{path}: workload {workload:?} has no match rule (process, executable, cgroup_prefix, systemd_unit or container_id)"
    )]
    NoRule { path: String, workload: String },
    #[error("{path}: two workloads are named {name:?}; names must be unique")]
    Duplicate { path: String, name: String },
}

/// What a matcher knows about a process.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts<'a> {
    pub name: &'a str,
    pub executable: Option<&'a str>,
    pub cgroup: Option<&'a str>,
}

/// Compiled match rules of one workload.
#[derive(Debug)]
struct WorkloadMatcher {
    name: String,
    process: GlobSet,
    executable: GlobSet,
    cgroup_prefix: Vec<String>,
    systemd_unit: Vec<String>,
    container_id: Vec<String>,
}

/// Every configured workload, in file order.
#[derive(Debug, Default)]
pub struct WorkloadRules {
    matchers: Vec<WorkloadMatcher>,
}

impl WorkloadRules {
    /// The first configured workload whose rules match the process.
    pub fn workload_of(&self, process: &ProcessFacts<'_>) -> Option<&str> {
        self.matchers
            .iter()
            .find(|m| m.matches(process))
            .map(|m| m.name.as_str())
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
            || crate::attribution::container_id(cgroup).is_some_and(|id| {
                self.container_id
                    .iter()
                    .any(|prefix| id.starts_with(prefix.as_str()))
            })
    }
}

fn glob_set(path: &str, workload: &str, patterns: &[String]) -> Result<GlobSet, ConfigError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|error| ConfigError::Glob {
            path: path.to_string(),
            workload: workload.to_string(),
            pattern: pattern.clone(),
            message: error.kind().to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|error| ConfigError::Glob {
        path: path.to_string(),
        workload: workload.to_string(),
        pattern: patterns.join(", "),
        message: error.to_string(),
    })
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

/// Parses a configuration text; `path` only names it in errors.
pub fn parse(path: &str, text: &str) -> Result<WorkloadRules, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map_or((1, 1), |span| line_and_column(text, span.start));
        ConfigError::Parse {
            path: path.to_string(),
            line,
            column,
            message: error.message().trim().replace('\n', "; "),
        }
    })?;
    let mut matchers: Vec<WorkloadMatcher> = Vec::new();
    for workload in config.workloads {
        if matchers.iter().any(|m| m.name == workload.name) {
            return Err(ConfigError::Duplicate {
                path: path.to_string(),
                name: workload.name,
            });
        }
        let has_rule = !(workload.process.is_empty()
            && workload.executable.is_empty()
            && workload.cgroup_prefix.is_empty()
            && workload.systemd_unit.is_empty()
            && workload.container_id.is_empty());
        if !has_rule {
            return Err(ConfigError::NoRule {
                path: path.to_string(),
                workload: workload.name,
            });
        }
        matchers.push(WorkloadMatcher {
            process: glob_set(path, &workload.name, &workload.process)?,
            executable: glob_set(path, &workload.name, &workload.executable)?,
            cgroup_prefix: workload.cgroup_prefix,
            systemd_unit: workload.systemd_unit,
            container_id: workload.container_id,
            name: workload.name,
        });
    }
    Ok(WorkloadRules { matchers })
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<WorkloadRules, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[workload]]
name = "trainer"
process = ["python*", "torchrun"]

[[workload]]
name = "loader"
executable = ["/opt/loader/bin/*"]
cgroup_prefix = ["/system.slice/etl"]

[[workload]]
name = "inference"
systemd_unit = ["triton.service"]
container_id = ["3f4e5d6c"]
"#;

    fn facts<'a>(
        name: &'a str,
        executable: Option<&'a str>,
        cgroup: Option<&'a str>,
    ) -> ProcessFacts<'a> {
        ProcessFacts {
            name,
            executable,
            cgroup,
        }
    }

    #[test]
    fn each_rule_kind_matches() {
        let rules = parse("envelope.toml", EXAMPLE).unwrap();
        assert_eq!(
            rules.workload_of(&facts("python3", None, None)),
            Some("trainer")
        );
        assert_eq!(
            rules.workload_of(&facts("torchrun", None, None)),
            Some("trainer")
        );
        assert_eq!(
            rules.workload_of(&facts("x", Some("/opt/loader/bin/etl"), None)),
            Some("loader")
        );
        assert_eq!(
            rules.workload_of(&facts("x", None, Some("/system.slice/etl-7.scope"))),
            Some("loader")
        );
        assert_eq!(
            rules.workload_of(&facts("x", None, Some("/system.slice/triton.service"))),
            Some("inference")
        );
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
        assert_eq!(
            rules.workload_of(&facts("x", None, Some(&format!("/kubepods/pod1/{id}")))),
            Some("inference")
        );
        assert_eq!(
            rules.workload_of(&facts("bash", Some("/usr/bin/bash"), Some("/user.slice"))),
            None
        );
    }

    #[test]
    fn the_first_matching_workload_wins() {
        let rules = parse("t.toml", "[[workload]]\nname = \"a\"\nprocess = [\"p*\"]\n[[workload]]\nname = \"b\"\nprocess = [\"python\"]\n").unwrap();
        assert_eq!(rules.workload_of(&facts("python", None, None)), Some("a"));
    }

    #[test]
    fn errors_say_where_and_what() {
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess = [\"p\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(error, "e.toml:4:1: invalid array; expected `]`");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nproces = [\"p\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("e.toml:3:1: unknown field `proces`"),
            "{error}"
        );
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no match rule"), "{error}");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess = [\"[\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("bad glob"), "{error}");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess=[\"x\"]\n[[workload]]\nname = \"a\"\nprocess=[\"y\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("two workloads are named \"a\""), "{error}");
        let error = load(Path::new("/nonexistent/envelope.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cannot read the configuration /nonexistent/envelope.toml"),
            "{error}"
        );
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
