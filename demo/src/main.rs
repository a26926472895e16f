//! `demo-app`: the demo backend. `cargo run -p demo --bin demo-app -- --sessions local` runs it
//! alone; point `--session-server` at a running session server for shared sessions.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use demo::{DemoConfig, Sessions};
use session_client::FallbackMode;
use session_client::cookie::Encryption;

/// Where sessions live.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SessionMode {
    /// In this process only: the baseline that loses sessions across instances.
    Local,
    /// In the session server (`--session-server`).
    Store,
    /// Injected by session-proxy's lookup plugin; writes to `--session-server`.
    Proxy,
}

/// Cookie fallback when the session server is unreachable.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Fallback {
    /// None: 503 while the store is down.
    Off,
    /// Serve from the signed snapshot cookie during an outage.
    OnOutage,
    /// Same, with the snapshot rewritten on every response.
    Always,
}

/// Flags of `demo-app`.
#[derive(Debug, Parser)]
#[command(
    name = "demo-app",
    version,
    about = "Stickless demo backend (personal centre)"
)]
struct Cli {
    /// Address to serve HTTP on (port 0: any free port; the bound address is printed on stdout
    /// as `listening http <ip:port>`).
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Instance name, sent in `x-served-by`.
    #[arg(long, env = "DEMO_NAME", default_value = "demo")]
    name: String,
    /// Where sessions live.
    #[arg(long, env = "DEMO_SESSIONS", value_enum, default_value = "store")]
    sessions: SessionMode,
    /// Session server URL (with `--sessions store`).
    #[arg(
        long,
        env = "DEMO_SESSION_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    session_server: String,
    /// Cookie fallback mode.
    #[arg(long, env = "DEMO_FALLBACK", value_enum, default_value = "off")]
    fallback: Fallback,
    /// Cookie key (hex or base64, at least 32 bytes); repeat for rotation, signing key first.
    #[arg(long = "cookie-key", env = "DEMO_COOKIE_KEYS", value_delimiter = ',', value_parser = parse_key)]
    cookie_keys: Vec<Vec<u8>>,
    /// Seal the snapshot cookie with AES-256-GCM (content hidden, not only signed).
    #[arg(long)]
    encrypt_cookies: bool,
    /// Send cookies without `Secure` (plain-HTTP localhost only).
    #[arg(long)]
    insecure_cookies: bool,
    /// Session namespace.
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// Bearer token for the session server.
    #[arg(long, env = "STICKLESS_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
}

/// A key given as hex or base64, at least 32 bytes.
fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    let bytes = session_client::cookie::key_from_text(text)
        .ok_or_else(|| "cookie key must be hex or base64".to_string())?;
    if bytes.len() < session_client::cookie::MIN_KEY_BYTES {
        return Err(format!(
            "cookie key must be at least 32 bytes, got {}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Prints `listening <role> <addr>` on stdout and flushes it: the one line a caller that
/// started us with port 0 reads to learn the bound address (nothing else goes to stdout).
fn report_listening(role: &str, addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening {role} {addr}")?;
    stdout.flush()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let fallback = match cli.fallback {
        Fallback::Off => FallbackMode::Off,
        Fallback::OnOutage => FallbackMode::OnOutage,
        Fallback::Always => FallbackMode::Always,
    };
    if !matches!(fallback, FallbackMode::Off) && cli.cookie_keys.is_empty() {
        eprintln!("demo-app: --fallback needs at least one --cookie-key");
        return ExitCode::from(2);
    }
    let config = DemoConfig {
        name: cli.name,
        sessions: match cli.sessions {
            SessionMode::Local => Sessions::Local,
            SessionMode::Store => Sessions::Store(cli.session_server),
            SessionMode::Proxy => Sessions::Proxy(cli.session_server),
        },
        fallback,
        cookie_keys: cli.cookie_keys,
        encryption: if cli.encrypt_cookies {
            Encryption::Aes256Gcm
        } else {
            Encryption::None
        },
        secure_cookies: !cli.insecure_cookies,
        namespace: cli.namespace,
        auth_token: cli.auth_token,
    };
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("demo-app: cannot listen on {}: {error}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    // The address-reporting contract: one line on stdout once bound, so that a caller who
    // passed port 0 learns the port.
    match listener.local_addr() {
        Ok(addr) => {
            if let Err(error) = report_listening("http", addr) {
                eprintln!("demo-app: cannot report the listening address: {error}");
                return ExitCode::FAILURE;
            }
        }
        Err(error) => {
            eprintln!("demo-app: cannot read the bound address: {error}");
            return ExitCode::FAILURE;
        }
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match demo::run(listener, &config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "demo-app failed");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::parse_key;

    #[test]
    fn keys_parse_as_hex_or_base64_and_must_be_long_enough() {
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), vec![0xab; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 40]);
        assert_eq!(parse_key(&b64).unwrap(), vec![7u8; 40]);
        assert!(parse_key("abcd").is_err());
        assert!(parse_key("not a key at all!").is_err());
    }
}
