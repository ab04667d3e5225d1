//! `fulcrum control`: the shared configuration of mesh mode, kept in etcd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use fulcrum_control::mesh::{ControlUrl, shared_part};
use fulcrum_discovery::EtcdClient;

/// Flags of `fulcrum control`.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Where the shared configuration lives: etcd://HOST:PORT, several hosts separated by
    /// commas, optionally followed by /KEY (default key /fulcrum/config).
    #[arg(long, value_name = "URL", global = true, default_value = "etcd://127.0.0.1:2379")]
    pub control: ControlUrl,
    #[command(flatten)]
    pub control_tls: ControlTls,
    #[command(subcommand)]
    pub action: ControlAction,
}

/// TLS to an `etcds://` control plane (etcd over https), for `--control` here and in
/// `fulcrum serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControlTls {
    /// A CA bundle (PEM) to verify etcd against, instead of the system's roots.
    #[arg(long, value_name = "FILE", global = true)]
    pub control_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's --client-cert-auth, with --control-key.
    #[arg(long, value_name = "FILE", global = true)]
    pub control_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", global = true)]
    pub control_key: Option<PathBuf>,
}

impl ControlTls {
    /// Whether any of the flags is given.
    pub fn is_set(&self) -> bool {
        self.control_ca.is_some() || self.control_cert.is_some() || self.control_key.is_some()
    }

    /// `url` with these files.
    pub fn apply(&self, url: &ControlUrl) -> anyhow::Result<ControlUrl> {
        url.clone()
            .with_tls(self.control_ca.clone(), self.control_cert.clone(), self.control_key.clone())
            .map_err(anyhow::Error::msg)
    }
}

/// What `fulcrum control` does.
#[derive(Debug, clap::Subcommand)]
pub enum ControlAction {
    /// Print the shared configuration (pools and routes) and its revision.
    Show,
    /// Validate a whole configuration file and publish its pools and routes to every proxy
    /// started with `--control` (they apply it within a second).
    Publish {
        /// The configuration file (TOML): a whole, valid configuration, such as one proxy's.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// Runs `fulcrum control`.
pub fn control(args: &ControlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    let url = args.control_tls.apply(&args.control)?;
    let client = EtcdClient::with_tls(&url.endpoints, Duration::from_secs(5), url.tls.as_ref())?;
    let key = &url.key;
    rt.block_on(async {
        match &args.action {
            ControlAction::Show => {
                let kv = client.get(key).await.with_context(|| format!("cannot read {key} from etcd"))?;
                match kv {
                    Some(kv) => {
                        println!("# {key} at revision {}", kv.mod_revision);
                        print!("{}", kv.value_str());
                    }
                    None => println!("# {key} is empty: the first proxy started with --control publishes its own"),
                }
            }
            ControlAction::Publish { config } => {
                let text =
                    std::fs::read_to_string(config).with_context(|| format!("cannot read {}", config.display()))?;
                fulcrum_config::Config::parse(&text, Some(config))?;
                let shared = shared_part(&text)?;
                let revision = client.put(key, &shared).await.with_context(|| format!("cannot write {key} to etcd"))?;
                println!("published the pools and routes of {} to {key} (revision {revision})", config.display());
            }
        }
        anyhow::Ok(())
    })
}
