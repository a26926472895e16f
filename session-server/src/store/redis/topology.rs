//! What the event subscriber needs to know of a Redis Cluster: its nodes, and which of them are
//! masters, read from a `CLUSTER NODES` reply. Pure parsing, unit-tested here.

use ::redis::{ConnectionAddr, ConnectionInfo};

/// One live node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Node {
    /// Host (IP or name) as the cluster announces it.
    pub(crate) host: String,
    /// Client port.
    pub(crate) port: u16,
    /// Whether it serves as a master (it then emits the expiry notifications of its keys).
    pub(crate) master: bool,
}

impl Node {
    /// `host:port`, for logs and as a map key.
    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// How to connect to it: the seed's settings (credentials, TLS) with its address.
    pub(crate) fn connection_info(&self, seed: &ConnectionInfo) -> ConnectionInfo {
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(self.host.clone(), self.port),
        };
        seed.clone().set_addr(addr)
    }
}

/// The live nodes of a `CLUSTER NODES` reply, masters first. Nodes flagged failing (`fail`,
/// `fail?`), still joining (`handshake`) or without an address (`noaddr`) are left out. A node
/// announced with an empty host is at `queried_host` (the node that answered knows no better).
pub(crate) fn parse_nodes(reply: &str, queried_host: &str) -> Vec<Node> {
    let mut nodes: Vec<Node> = reply
        .lines()
        .filter_map(|line| parse_line(line, queried_host))
        .collect();
    nodes.sort_by(|a, b| b.master.cmp(&a.master).then_with(|| a.cmp(b)));
    nodes.dedup();
    nodes
}

/// One line: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> ...`.
fn parse_line(line: &str, queried_host: &str) -> Option<Node> {
    let mut fields = line.split_whitespace();
    let _id = fields.next()?;
    let address = fields.next()?;
    let flags: Vec<&str> = fields.next()?.split(',').collect();
    let unusable = ["fail", "fail?", "handshake", "noaddr"];
    if flags.iter().any(|f| unusable.contains(f)) {
        return None;
    }
    let endpoint = address.split(['@', ',']).next()?;
    let (host, port) = endpoint.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = if host.is_empty() { queried_host } else { host };
    Some(Node {
        host: host.to_string(),
        port,
        master: flags.contains(&"master"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,node-2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 1426238317741 1426238316232 3 disconnected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave,fail? 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 handshake - 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca :30001@31001 myself,master - 0 0 1 connected 0-5460
";

    #[test]
    fn live_nodes_come_masters_first_and_failing_ones_are_left_out() {
        let nodes = parse_nodes(REPLY, "10.0.0.1");
        let seen: Vec<(String, bool)> = nodes.iter().map(|n| (n.address(), n.master)).collect();
        assert_eq!(
            seen,
            vec![
                ("10.0.0.1:30001".to_string(), true),
                ("127.0.0.1:30002".to_string(), true),
                ("127.0.0.1:30004".to_string(), false),
            ]
        );
    }

    #[test]
    fn a_node_is_reached_with_the_seed_settings() {
        use ::redis::IntoConnectionInfo;
        let seed = "redis://:pw@127.0.0.1:7000/0"
            .into_connection_info()
            .expect("url");
        let node = Node {
            host: "127.0.0.2".into(),
            port: 7001,
            master: true,
        };
        let info = node.connection_info(&seed);
        assert!(matches!(info.addr(), ConnectionAddr::Tcp(h, 7001) if h == "127.0.0.2"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert!(parse_nodes("garbage\n\n", "h").is_empty());
    }
}
