//! The nginx and HAProxy configurations: a template from `deploy/` filled in for one start,
//! and the work directory it names.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{ExternalError, workdir_error};

/// Creates `workdir` when missing and returns its absolute form; refuses paths the nginx
/// configuration could not quote.
pub(super) fn prepare_workdir(workdir: &Path) -> Result<PathBuf, ExternalError> {
    // Written inside double quotes in nginx.conf, where these would end or escape the string.
    let quotable = |path: &Path| {
        path.to_str().is_some_and(|text| {
            !text
                .chars()
                .any(|c| matches!(c, '"' | '\\' | '$') || c.is_control())
        })
    };
    let refuse = || ExternalError::Workdir {
        path: workdir.to_owned(),
        reason: "the path must be UTF-8 without quotes, backslashes, $ or control characters"
            .to_owned(),
    };
    if !quotable(workdir) {
        return Err(refuse());
    }
    fs::create_dir_all(workdir).map_err(|e| workdir_error(workdir, e))?;
    let absolute = fs::canonicalize(workdir).map_err(|e| workdir_error(workdir, e))?;
    if !quotable(&absolute) {
        return Err(refuse());
    }
    Ok(absolute)
}

/// The template with its placeholders filled in: every line holding `{{BACKEND}}` is repeated
/// once per backend (`{{NAME}}` = s1, s2, ...); `{{LISTEN}}`, `{{WORKDIR}}` and `{{USER}}`
/// (`user root;` for a root start, so workers can use a root-only work directory) are replaced.
pub(super) fn render(
    template: &str,
    backends: &[SocketAddr],
    listen: SocketAddr,
    workdir: &Path,
    root: bool,
) -> String {
    let user = if root {
        "user root;"
    } else {
        "# not started as root: nginx runs as the caller's user"
    };
    let mut out = String::with_capacity(template.len() + 128 * backends.len());
    for line in template.lines() {
        if line.contains("{{BACKEND}}") {
            for (i, backend) in backends.iter().enumerate() {
                let line = line
                    .replace("{{BACKEND}}", &backend.to_string())
                    .replace("{{NAME}}", &format!("s{}", i + 1));
                out.push_str(&line);
                out.push('\n');
            }
            continue;
        }
        let line = line
            .replace("{{LISTEN}}", &listen.to_string())
            .replace("{{WORKDIR}}", &workdir.display().to_string())
            .replace("{{USER}}", user);
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::external::ExternalKind;

    fn backends() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:8081".parse().unwrap(),
            "127.0.0.1:8082".parse().unwrap(),
        ]
    }

    #[test]
    fn every_placeholder_is_filled_in_every_template() {
        for kind in ExternalKind::ALL {
            for root in [true, false] {
                let text = render(
                    kind.template(),
                    &backends(),
                    "127.0.0.1:9000".parse().unwrap(),
                    Path::new("/tmp/work"),
                    root,
                );
                assert!(!text.contains("{{"), "{kind}: {text}");
                assert!(text.contains("127.0.0.1:9000"), "{kind} listens");
            }
        }
    }

    #[test]
    fn backend_lines_are_repeated_once_per_backend_with_their_names() {
        let listen = "127.0.0.1:9000".parse().unwrap();
        let text = render(
            ExternalKind::HaproxyCookieInsert.template(),
            &backends(),
            listen,
            Path::new("/w"),
            false,
        );
        assert!(
            text.contains("server s1 127.0.0.1:8081 check inter 500ms fall 1 rise 1 cookie s1")
        );
        assert!(
            text.contains("server s2 127.0.0.1:8082 check inter 500ms fall 1 rise 1 cookie s2")
        );
        let nginx = render(
            ExternalKind::NginxIpHash.template(),
            &backends(),
            listen,
            Path::new("/w"),
            true,
        );
        assert_eq!(nginx.matches("max_fails=1 fail_timeout=2s;").count(), 2);
        assert!(nginx.contains("\nuser root;\n"));
        assert!(nginx.contains("pid \"/w/nginx.pid\";"));
    }
}
