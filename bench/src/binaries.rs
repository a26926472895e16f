//! Finding the project's own binaries (`session-server`, `demo-app`, `session-proxy`) next to
//! the running executable, and building them with cargo when one is missing.
//!
//! The running executable is `target/<profile>/compare` or, for tests,
//! `target/<profile>/deps/<test>-<hash>`; either way the binaries live in `target/<profile>/`.
//!
//! Each binary listens where it is told, port 0 included, and prints one line to stdout per
//! listener right after binding it: `listening <role> <ip:port>` (roles: session-server `grpc`
//! and `metrics`, session-proxy `proxy` and `admin`, demo-app `http`). [`Reported`] collects
//! those lines from a child's stdout, so a harness starts every child on port 0 and reads back
//! where it listens instead of picking a free port and racing to bind it.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

/// Why the binaries cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    /// The running executable's path is unknown.
    #[error("cannot find the running executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// Some binaries are missing and cargo could not build them.
    #[error(
        "missing {missing:?} in {dir}; build them with `cargo build{release} -p session-server \
         -p demo -p proxy-plugin --bins` ({why})"
    )]
    Missing {
        /// File names not found.
        missing: Vec<String>,
        /// Where they were looked for.
        dir: PathBuf,
        /// ` --release` when the harness runs from the release profile.
        release: &'static str,
        /// What went wrong building them.
        why: String,
    },
}

/// Paths of the three binaries a cluster is made of.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `session-server` (crate session-server).
    pub session_server: PathBuf,
    /// `demo-app` (crate demo).
    pub demo_app: PathBuf,
    /// `session-proxy` (crate proxy-plugin).
    pub session_proxy: PathBuf,
    /// Whether this `session-proxy` has `--session-snapshot-key` (the lookup plugin's
    /// signed-snapshot fallback for store outages).
    pub proxy_snapshot_key: bool,
}

/// The file names, in the order of [`Binaries`]' fields.
const NAMES: [&str; 3] = ["session-server", "demo-app", "session-proxy"];

impl Binaries {
    /// The binaries next to the running executable; when one is missing and `cargo` is on
    /// `PATH`, builds them first (same profile as the running executable).
    pub fn locate() -> Result<Binaries, BinariesError> {
        let exe = std::env::current_exe().map_err(BinariesError::CurrentExe)?;
        Binaries::locate_in(&profile_dir(&exe))
    }

    /// The binaries in `dir` (a `target/<profile>` directory), built when missing. When they
    /// are older than this workspace's sources they are rebuilt too (cargo decides what is
    /// really out of date), so a comparison never measures yesterday's code; without cargo,
    /// stale binaries are used with a warning.
    pub fn locate_in(dir: &Path) -> Result<Binaries, BinariesError> {
        let missing = missing_in(dir);
        if missing.is_empty() && stale(dir) {
            if let Err(why) = build(dir) {
                tracing::warn!(%why, "the binaries are older than the sources; using them anyway");
            }
        } else if !missing.is_empty() {
            let release = if profile_name(dir) == "release" {
                " --release"
            } else {
                ""
            };
            let missing_error = |why: String| BinariesError::Missing {
                missing: missing.clone(),
                dir: dir.to_owned(),
                release,
                why,
            };
            build(dir).map_err(missing_error)?;
            if !missing_in(dir).is_empty() {
                return Err(missing_error(
                    "cargo build succeeded but they are still not there".into(),
                ));
            }
        }
        let path = |name: &str| dir.join(name);
        let session_proxy = path("session-proxy");
        let proxy_snapshot_key = has_flag(&session_proxy, "--session-snapshot-key");
        Ok(Binaries {
            session_server: path("session-server"),
            demo_app: path("demo-app"),
            session_proxy,
            proxy_snapshot_key,
        })
    }
}

/// The role and address of a `listening <role> <ip:port>` line (the address-reporting
/// contract), or `None` for any other line.
pub fn parse_listening(line: &str) -> Option<(&str, SocketAddr)> {
    let mut words = line.trim_end().split(' ');
    let (Some("listening"), Some(role), Some(addr), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some((role, addr.parse().ok()?))
}

/// The addresses a child has reported on its stdout so far, by role. A thread reads the
/// child's stdout to its end, copies every line to the child's log and records each
/// `listening` line; clones share what it records.
#[derive(Debug, Clone, Default)]
pub struct Reported {
    /// Role -> address, as reported (a role reported twice keeps its last address).
    addrs: Arc<Mutex<HashMap<String, SocketAddr>>>,
}

impl Reported {
    /// Starts the thread that reads `stdout` and copies each line to `log`.
    pub fn tee(stdout: ChildStdout, mut log: impl std::io::Write + Send + 'static) -> Reported {
        let reported = Reported::default();
        let addrs = reported.addrs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((role, addr)) = parse_listening(&line) {
                    addrs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(role.to_owned(), addr);
                }
                // The log is for people: a failed write must not stop the recording.
                let _ = writeln!(log, "{line}");
            }
        });
        reported
    }

    /// The address reported for `role`, if it has been reported yet.
    pub fn get(&self, role: &str) -> Option<SocketAddr> {
        self.addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(role)
            .copied()
    }
}

/// `target/<profile>` from the running executable's path.
fn profile_dir(exe: &Path) -> PathBuf {
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_owned()
    } else {
        dir.to_owned()
    }
}

/// The profile a `target/<profile>` directory belongs to (`debug` is cargo's `dev`).
fn profile_name(dir: &Path) -> String {
    dir.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn missing_in(dir: &Path) -> Vec<String> {
    NAMES
        .iter()
        .filter(|name| !dir.join(name).is_file())
        .map(|name| (*name).to_owned())
        .collect()
}

/// The crates whose binaries (or dependencies of them) the harness runs.
const SOURCE_CRATES: [&str; 5] = [
    "proto",
    "session-server",
    "session-client",
    "demo",
    "proxy-plugin",
];

/// This workspace's root: the bench crate's parent directory.
fn workspace_root() -> Option<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent()
}

/// Whether some source of the binaries is newer than the oldest binary (false when the
/// sources are not around, e.g. a harness copied elsewhere).
fn stale(dir: &Path) -> bool {
    let Some(root) = workspace_root() else {
        return false;
    };
    let oldest_binary = NAMES
        .iter()
        .filter_map(|name| modified(&dir.join(name)))
        .min();
    let Some(oldest_binary) = oldest_binary else {
        return false;
    };
    let mut newest_source = modified(&root.join("Cargo.lock"));
    for krate in SOURCE_CRATES {
        let krate = root.join(krate);
        newest_source = newest_source.max(newest_in(&krate.join("src")));
        for file in ["Cargo.toml", "build.rs", "session.proto"] {
            newest_source = newest_source.max(modified(&krate.join(file)));
        }
    }
    newest_source.is_some_and(|newest| newest > oldest_binary)
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of any file under `dir`.
fn newest_in(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                newest = newest.max(modified(&path));
            }
        }
    }
    newest
}

/// `cargo build --profile P -p session-server -p demo -p proxy-plugin --bins`, in this
/// workspace, into the target directory that holds `dir`.
fn build(dir: &Path) -> Result<(), String> {
    let profile = match profile_name(dir).as_str() {
        "debug" => "dev".to_owned(),
        other => other.to_owned(),
    };
    let target_dir = dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", dir.display()))?;
    let workspace = workspace_root().ok_or("the bench crate has no parent directory")?;
    tracing::warn!(
        profile,
        "building session-server, demo-app and session-proxy with cargo (missing or older \
         than their sources)"
    );
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace)
        .args(["build", "--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .args([
            "-p",
            "session-server",
            "-p",
            "demo",
            "-p",
            "proxy-plugin",
            "--bins",
        ])
        .stdin(Stdio::null())
        .status()
        .map_err(|error| format!("cannot run cargo: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build failed ({status})"))
    }
}

/// Whether `program --help` mentions `flag`.
fn has_flag(program: &Path, flag: &str) -> bool {
    Command::new(program)
        .arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_dir_is_found_for_binaries_and_test_executables() {
        assert_eq!(
            profile_dir(Path::new("/w/target/release/compare")),
            Path::new("/w/target/release")
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/debug/deps/claims-0123abcd")),
            Path::new("/w/target/debug")
        );
    }

    #[test]
    fn listening_lines_give_their_role_and_address_and_nothing_else_does() {
        assert_eq!(
            parse_listening("listening grpc 127.0.0.1:40123\n"),
            Some(("grpc", "127.0.0.1:40123".parse().unwrap()))
        );
        assert_eq!(
            parse_listening("listening admin [::1]:9"),
            Some(("admin", "[::1]:9".parse().unwrap()))
        );
        for other in [
            "",
            "listening",
            "listening http",
            "listening http 127.0.0.1",
            "listening http 127.0.0.1:1 extra",
            "2026-01-01 INFO proxy listening address=127.0.0.1:1",
        ] {
            assert_eq!(parse_listening(other), None, "{other:?}");
        }
    }
}
