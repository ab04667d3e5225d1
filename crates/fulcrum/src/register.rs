//! `fulcrum register`: keeps a backend registered with the proxies while it runs.

use std::net::SocketAddr;

use anyhow::Context as _;
use fulcrum_discovery::{RegisterArgs as Registration, RegisterTarget, run_register};

/// Flags of `fulcrum register`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["etcd", "admin"])))]
pub struct RegisterArgs {
    /// The backend's address, as the proxies should reach it.
    #[arg(long)]
    pub address: SocketAddr,
    /// Register in etcd (host:port[,host:port...], or https://host:port for etcd over TLS)
    /// under --prefix, for pools whose discovery is `kind = "etcd"` on that prefix.
    #[arg(long, value_name = "HOSTS", requires = "prefix")]
    pub etcd: Option<String>,
    /// With an https etcd: a CA bundle (PEM) to verify it against, instead of the system's roots.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// With an https etcd: a client certificate (PEM) for its --client-cert-auth, with --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_key"])]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_cert"])]
    pub etcd_key: Option<std::path::PathBuf>,
    /// The etcd key prefix the proxies watch (the key is the prefix and the id).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Register with a proxy's admin API (http://host:port), in --pool, whose discovery is
    /// `kind = "registration"`.
    #[arg(long, value_name = "URL", requires = "pool")]
    pub admin: Option<String>,
    /// The pool (with --admin).
    #[arg(long)]
    pub pool: Option<String>,
    /// A file holding the admin API's bearer token, with --admin (else the
    /// FULCRUM_ADMIN_TOKEN environment variable, if set).
    #[arg(long, value_name = "FILE", requires = "admin")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// The endpoint's id (default: its address).
    #[arg(long)]
    pub id: Option<String>,
    /// Its weight.
    #[arg(long)]
    pub weight: Option<u32>,
    /// A model it serves (repeatable).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// A label, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// How long after its last heartbeat the backend leaves the pools (heartbeats go every
    /// third of it).
    #[arg(long, default_value = "10s", value_parser = fulcrum_config::parse_duration)]
    pub ttl: std::time::Duration,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: a label is key=value"))
}

/// Registers, sends heartbeats until Ctrl-C or SIGTERM, then deregisters.
pub fn register(args: &RegisterArgs) -> anyhow::Result<()> {
    let target = match (&args.etcd, &args.prefix, &args.admin, &args.pool) {
        (Some(hosts), Some(prefix), None, _) => {
            let client_cert = args
                .etcd_cert
                .clone()
                .zip(args.etcd_key.clone())
                .map(|(cert, key)| fulcrum_config::CertificateFiles { cert, key });
            let tls = (args.etcd_ca.is_some() || client_cert.is_some()).then(|| fulcrum_config::UpstreamTls {
                server_name: None,
                ca: args.etcd_ca.clone(),
                client_cert,
            });
            // With TLS files, a bare host:port is https, and an http:// one a mistake.
            let mut endpoints = Vec::new();
            for host in hosts.split(',') {
                match (tls.is_some(), host.split_once("://")) {
                    (true, None) => endpoints.push(format!("https://{host}")),
                    (true, Some(("http", _))) => {
                        anyhow::bail!("--etcd {host}: plain http, but --etcd-ca/--etcd-cert are given: use https://")
                    }
                    _ => endpoints.push(host.to_owned()),
                }
            }
            RegisterTarget::Etcd { endpoints, prefix: prefix.clone(), tls }
        }
        (None, _, Some(url), Some(pool)) => RegisterTarget::Admin {
            url: url.clone(),
            pool: pool.clone(),
            token: crate::serve::read_admin_token(args.admin_token_file.as_deref())?
                .map(|t| fulcrum_discovery::BearerToken::new(&t))
                .transpose()
                .map_err(anyhow::Error::msg)?,
        },
        _ => anyhow::bail!("give either --etcd HOSTS --prefix P or --admin URL --pool NAME"),
    };
    let registration = Registration {
        target,
        address: args.address,
        id: args.id.clone(),
        weight: args.weight,
        models: args.models.clone(),
        labels: args.labels.clone(),
        ttl: args.ttl,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    rt.block_on(run_register(registration, crate::serve::shutdown_signal()))?;
    Ok(())
}
