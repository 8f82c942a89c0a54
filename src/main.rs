//! The `pullthrough` binary: parses arguments, sets up logging, runs one role.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pullthrough::api::{ProxyConfig, UpstreamConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pullthrough",
    version,
    about = "Kubernetes-native pull-through caching registry"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PULLTHROUGH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Run the caching registry (the data plane). With no flags: port 5000, cache in
    /// ./pullthrough-cache, mirroring docker.io.
    Proxy(ProxyArgs),
    /// Reconcile RegistryMirror resources into running caches (in-cluster, leader-elected).
    Controller(ControllerArgs),
    /// Write containerd hosts.toml files on this node for the Ready mirrors that select it.
    NodeAgent(NodeAgentArgs),
    /// Hand pulls from the node's loopback to a mirror unchanged: a node-local entry point
    /// (`127.0.0.1:PORT/<registry>/<repo>`, which containerd pulls over plain HTTP).
    Relay {
        /// Where to listen (the node's loopback, with hostNetwork).
        #[arg(long, default_value = "127.0.0.1:5001", value_parser = parse_listen)]
        listen: SocketAddr,
        /// The mirror: http://HOST:PORT (its Service).
        #[arg(long)]
        to: String,
    },
    /// Print the RegistryMirror CustomResourceDefinition as YAML.
    Crd,
    /// Print the OpenShift ImageDigestMirrorSet and ImageTagMirrorSet that point nodes at a
    /// Ready RegistryMirror (`kubectl get registrymirror NAME -o yaml | pullthrough
    /// openshift-mirror-sets`), for clusters that configure nodes through them.
    OpenshiftMirrorSets {
        /// The RegistryMirror as YAML or JSON (`-`: standard input).
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Manage a running proxy's cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Carry images between caches as an OCI image layout (a directory or a tar), for
    /// clusters that cannot reach the upstream (docs/operations.md, "An air-gapped cluster").
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Write images a cache holds, every platform it holds of each, as an OCI image
    /// layout. Default: every image the cache holds.
    Export {
        /// Where: a directory, or a tar file when it ends in .tar.
        out: PathBuf,
        /// Only this image, e.g. docker.io/library/alpine:3.20 (repeatable).
        #[arg(long = "image", value_name = "REFERENCE")]
        images: Vec<String>,
        /// Only the images listed in this file, one per line (# starts a comment).
        #[arg(long, value_name = "FILE")]
        images_from: Option<PathBuf>,
        /// Only the images in use by the mirror's workloads, as the running proxy at
        /// --admin-url was told by the controller.
        #[arg(long)]
        in_use: bool,
        /// The running proxy (with --in-use).
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        cache: BundleCache,
    },
    /// Seed a cache from an OCI image layout (a directory, a tar, a tar at an http(s)://
    /// URL, or s3://<bucket>/<key> in the cache's own bucket): every digest is checked, every image must be whole, and a bundle
    /// that fails is refused with nothing of it kept. A disk cache takes it before its
    /// proxy starts; a bucket at any time.
    Import {
        /// The bundle.
        bundle: String,
        /// Keep the cache's own record of a tag the bundle also names.
        #[arg(long)]
        keep_tags: bool,
        #[command(flatten)]
        cache: BundleCache,
    },
}

/// How a command reaches a running proxy's admin endpoint.
#[derive(clap::Args)]
struct AdminArgs {
    /// The proxy's operations address.
    #[arg(
        long,
        env = "PULLTHROUGH_ADMIN_URL",
        default_value = "http://127.0.0.1:9095"
    )]
    admin_url: String,
    /// The proxy's admin token file (default: admin-token in the cache directory).
    #[arg(long, env = "PULLTHROUGH_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

/// Which cache a bundle command works on.
#[derive(clap::Args)]
struct BundleCache {
    /// The proxy's YAML configuration (its cacheDir, or its storage.s3 bucket).
    #[arg(long, short, env = "PULLTHROUGH_CONFIG")]
    config: Option<PathBuf>,
    /// The cache directory (overrides the configuration's).
    #[arg(long, env = "PULLTHROUGH_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Drop an image (and the blobs only it uses), a tag alone, or a whole repository
    /// from a running proxy's cache.
    Drop {
        /// Image reference, e.g. docker.io/library/alpine:3.20 or ghcr.io/org/app@sha256:...;
        /// with --repository, a repository (docker.io/library/alpine).
        image: String,
        /// Forget only where the tag points (the next pull asks the upstream); keep the
        /// image.
        #[arg(long, conflicts_with = "repository")]
        tag: bool,
        /// Drop every tag and image of the repository, and its links.
        #[arg(long)]
        repository: bool,
        #[command(flatten)]
        admin: AdminArgs,
        /// The proxy's cache directory, where its admin token is by default.
        #[arg(
            long,
            env = "PULLTHROUGH_CACHE_DIR",
            default_value = "pullthrough-cache"
        )]
        cache_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct NodeAgentArgs {
    /// Directory the agent writes <registry>/hosts.toml into.
    #[arg(
        long,
        env = "PULLTHROUGH_CERTS_DIR",
        default_value = "/etc/containerd/certs.d"
    )]
    certs_dir: PathBuf,
    /// The same directory as containerd on the host sees it (to check its config_path).
    #[arg(
        long,
        env = "PULLTHROUGH_CONTAINERD_CERTS_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    containerd_certs_path: String,
    /// containerd's config file, read to tell whether config_path is enabled.
    #[arg(
        long,
        env = "PULLTHROUGH_CONTAINERD_CONFIG",
        default_value = "/etc/containerd/config.toml"
    )]
    containerd_config: PathBuf,
    /// The directory of CRI-O's, podman's and skopeo's registries configuration; the agent
    /// writes registries.conf.d/50-pullthrough.conf and each HTTPS mirror's CA under certs.d.
    #[arg(
        long,
        env = "PULLTHROUGH_CONTAINERS_DIR",
        default_value = "/etc/containers"
    )]
    containers_dir: PathBuf,
    /// When to write the registries.conf.d drop-in: auto (on a CRI-O node, or where
    /// registries.conf is), always, never.
    #[arg(long, value_enum, default_value = "auto")]
    containers: pullthrough::node_agent::WriteContainers,
    /// The procfs in which CRI-O is looked for, to signal it when the drop-in changes (the
    /// host's: the DaemonSet needs hostPID).
    #[arg(long, default_value = "/proc")]
    proc_dir: PathBuf,
    /// Do not signal CRI-O when the drop-in changes: it runs with auto_reload_registries.
    #[arg(long)]
    crio_reloads_itself: bool,
    /// Ask each mirror whether it answers from this node (a connection within 1 s, /v2/
    /// within 2 s), every --probe-interval, and leave out of the node's files a mirror that
    /// failed twice in a row (with --standalone: once) until it answers again.
    #[arg(long)]
    probe_mirrors: bool,
    /// How often mirrors are asked, with --probe-mirrors.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    probe_interval: std::time::Duration,
    /// Name of the node this agent runs on.
    #[arg(long, env = "NODE_NAME", required_unless_present = "standalone")]
    node_name: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "PULLTHROUGH_METRICS_LISTEN",
        default_value = "0.0.0.0:9096",
        value_parser = parse_listen
    )]
    metrics_listen: SocketAddr,
    /// How often to re-check even without changes (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    resync: std::time::Duration,
    /// Without Kubernetes: write files for the --mirror flags once and exit (no --mirror
    /// removes every file the agent wrote).
    #[arg(long)]
    standalone: bool,
    /// With --standalone: REGISTRY=ENDPOINT, e.g. docker.io=http://10.0.0.5:5000 (repeatable).
    #[arg(
        long = "mirror",
        value_name = "REGISTRY=ENDPOINT",
        requires = "standalone"
    )]
    mirrors: Vec<String>,
    /// With --standalone: REGISTRY=URL of the upstream itself, the fallback (default
    /// https://registry-1.docker.io for docker.io, https://REGISTRY otherwise).
    #[arg(long = "server", value_name = "REGISTRY=URL", requires = "standalone")]
    servers: Vec<String>,
    /// With --standalone: REGISTRY=FILE, the CA certificate (PEM) that signed the
    /// certificate of that registry's mirror, when it serves HTTPS (repeatable).
    #[arg(long = "ca", value_name = "REGISTRY=FILE", requires = "standalone")]
    cas: Vec<String>,
}

fn parse_quantity(s: &str) -> Result<u64, pullthrough::api::quantity::QuantityError> {
    pullthrough::api::quantity::to_bytes(s)
}

fn parse_listen(s: &str) -> Result<SocketAddr, pullthrough::api::proxy_config::ListenError> {
    pullthrough::api::proxy_config::parse_listen(s)
}

fn parse_duration(
    s: &str,
) -> Result<std::time::Duration, pullthrough::api::duration::DurationError> {
    pullthrough::api::duration::parse(s)
}

fn pairs(
    flag: &str,
    values: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    values
        .iter()
        .map(|v| {
            let (k, val) = v
                .split_once('=')
                .filter(|(k, val)| !k.is_empty() && !val.is_empty())
                .with_context(|| format!("--{flag} {v:?}: expected REGISTRY=URL"))?;
            Ok((k.to_string(), val.to_string()))
        })
        .collect()
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Container image the proxy pods run (normally the controller's own image).
    #[arg(long, env = "PULLTHROUGH_PROXY_IMAGE")]
    proxy_image: String,
    /// imagePullPolicy of the proxy pods.
    #[arg(long, env = "PULLTHROUGH_PROXY_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "PULLTHROUGH_METRICS_LISTEN",
        default_value = "0.0.0.0:9095",
        value_parser = parse_listen
    )]
    metrics_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pullthrough-system")]
    lease_namespace: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconcile only the RegistryMirrors of this namespace (default: every namespace).
    #[arg(long, env = "PULLTHROUGH_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Serve the image-rewriting admission webhook (HTTPS) here, on every replica
    /// (docs/rewrite.md); not served unless given.
    #[arg(long, env = "PULLTHROUGH_WEBHOOK_LISTEN", value_parser = parse_listen)]
    webhook_listen: Option<SocketAddr>,
    /// Who makes the webhook's serving certificate: the controller (`self`, a CA of its
    /// own) or cert-manager (the controller only reads the Secret).
    #[arg(
        long,
        env = "PULLTHROUGH_WEBHOOK_CERTS",
        value_enum,
        default_value = "self"
    )]
    webhook_certs: pullthrough::controller::rewrite::certs::Issuance,
    /// The Secret (in the controller's namespace) holding the webhook's certificate.
    #[arg(
        long,
        env = "PULLTHROUGH_WEBHOOK_SECRET",
        default_value = "pullthrough-webhook-tls"
    )]
    webhook_secret: String,
    /// The names the self-made certificate carries (comma-separated; default: the
    /// webhook Service's, `pullthrough-webhook.<namespace>.svc`).
    #[arg(long, env = "PULLTHROUGH_WEBHOOK_HOSTS", value_delimiter = ',')]
    webhook_hosts: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps (self-made
    /// certificates only).
    #[arg(
        long,
        env = "PULLTHROUGH_WEBHOOK_CONFIGURATION",
        default_value = "pullthrough-rewrite"
    )]
    webhook_configuration: String,
}

/// The node agent's options from its flags.
fn agent_options(args: &NodeAgentArgs) -> pullthrough::node_agent::AgentOptions {
    pullthrough::node_agent::AgentOptions {
        certs_dir: args.certs_dir.clone(),
        containerd_certs_path: args.containerd_certs_path.clone(),
        containerd_config: args.containerd_config.clone(),
        probe: args.probe_mirrors.then_some(args.probe_interval),
        containers: pullthrough::node_agent::ContainersOptions {
            proc_dir: args.proc_dir.clone(),
            signal_crio: !args.crio_reloads_itself,
            ..pullthrough::node_agent::ContainersOptions::under(
                &args.containers_dir,
                args.containers,
            )
        },
    }
}

/// The controller's options from its flags: this replica's identity, and the webhook's
/// certificate naming its Service unless told otherwise.
fn controller_options(args: ControllerArgs) -> pullthrough::controller::ControllerOptions {
    use pullthrough::controller::rewrite::{WebhookOptions, certs::CertOptions};
    let identity = args
        .identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("pullthrough-controller-{}", std::process::id()));
    let ns = &args.lease_namespace;
    let hosts = if args.webhook_hosts.is_empty() {
        vec![
            format!("pullthrough-webhook.{ns}.svc"),
            format!("pullthrough-webhook.{ns}.svc.cluster.local"),
        ]
    } else {
        args.webhook_hosts
    };
    let webhook = args.webhook_listen.map(|listen| WebhookOptions {
        listen,
        certs: CertOptions {
            namespace: ns.clone(),
            secret: args.webhook_secret,
            hosts,
            issuance: args.webhook_certs,
            configuration: Some(args.webhook_configuration),
        },
    });
    pullthrough::controller::ControllerOptions {
        settings: pullthrough::controller::builders::ChildSettings {
            proxy_image: args.proxy_image,
            image_pull_policy: args.image_pull_policy,
        },
        metrics_listen: args.metrics_listen,
        lease_namespace: args.lease_namespace,
        identity,
        namespace: args.namespace,
        webhook,
    }
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// YAML configuration file (the format the controller writes); flags override it.
    #[arg(long, short, env = "PULLTHROUGH_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the registry API: IP:PORT, :PORT (every interface) or localhost:PORT.
    #[arg(long, env = "PULLTHROUGH_LISTEN", value_parser = parse_listen)]
    listen: Option<SocketAddr>,
    /// Address of /metrics, /healthz and /readyz (the forms --listen takes).
    #[arg(long, env = "PULLTHROUGH_METRICS_LISTEN", value_parser = parse_listen)]
    metrics_listen: Option<SocketAddr>,
    /// Cache directory.
    #[arg(long, env = "PULLTHROUGH_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Size limit of the cache, as a quantity (e.g. 20Gi, 500M); least recently used
    /// objects are evicted to stay under it.
    #[arg(long, env = "PULLTHROUGH_MAX_CACHE_SIZE", value_parser = parse_quantity)]
    max_cache_size: Option<u64>,
    /// Mirror this registry, as REGISTRY or REGISTRY=URL (repeatable; replaces the
    /// configured upstreams). Example: --upstream ghcr.io --upstream registry.local=http://10.0.0.5:5000
    #[arg(long = "upstream", value_name = "REGISTRY[=URL]")]
    upstreams: Vec<String>,
    /// Registry served to clients that send no ?ns= (default: the first upstream).
    #[arg(long, env = "PULLTHROUGH_DEFAULT_UPSTREAM")]
    default_upstream: Option<String>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The proxy configuration in the YAML file `path`; the defaults without one.
fn config_file(path: Option<&std::path::Path>) -> anyhow::Result<ProxyConfig> {
    let Some(path) = path else {
        return Ok(ProxyConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    ProxyConfig::from_yaml(&text)
        .with_context(|| format!("config file {} is not valid", path.display()))
}

fn proxy_config(args: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let mut config = config_file(args.config.as_deref())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(l) = args.metrics_listen {
        config.metrics_listen = l;
    }
    if let Some(d) = &args.cache_dir {
        config.cache_dir = d.clone();
    }
    if let Some(limit) = args.max_cache_size {
        config.max_cache_bytes = Some(limit);
    }
    if !args.upstreams.is_empty() {
        config.upstreams = args
            .upstreams
            .iter()
            .map(|spec| {
                let (registry, url) = match spec.split_once('=') {
                    Some((r, u)) => (r, Some(u.to_string())),
                    None => (spec.as_str(), None),
                };
                UpstreamConfig {
                    url,
                    ..UpstreamConfig::new(registry)
                }
            })
            .collect();
    }
    if let Some(d) = &args.default_upstream {
        config.default_upstream = Some(d.clone());
    }
    config.validate().context("invalid configuration")?;
    Ok(config)
}

fn init_tracing(format: &str) {
    init_tracing_to(format, false)
}

/// Logs to standard error (`to_stderr`: a command whose standard output is its answer)
/// or standard output.
fn init_tracing_to(format: &str, to_stderr: bool) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files, pipes and kubectl logs.
    let terminal = match to_stderr {
        true => std::io::stderr().is_terminal(),
        false => std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal);
    match (format == "json", to_stderr) {
        (true, true) => builder.json().with_writer(std::io::stderr).init(),
        (true, false) => builder.json().init(),
        (false, true) => builder.with_writer(std::io::stderr).init(),
        (false, false) => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Prints an error the way a user needs it: one line, each cause once (many messages
/// already include their source's), and never a backtrace, whatever `RUST_BACKTRACE` says
/// (these are the user's errors, not the program's).
fn report(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    format!("error: {text}")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.role {
        Role::Proxy(args) => {
            let config = proxy_config(&args)?;
            if args.print_config {
                print!("{}", config.redacted().to_yaml());
                return Ok(());
            }
            init_tracing(&cli.log_format);
            pullthrough::proxy::run(config, shutdown_signal()).await?;
        }
        Role::Controller(args) => {
            init_tracing(&cli.log_format);
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let options = controller_options(args);
            pullthrough::controller::run(client, options, shutdown_signal()).await?;
        }
        Role::NodeAgent(args) => {
            init_tracing(&cli.log_format);
            let options = agent_options(&args);
            if args.standalone {
                let mirrors = pairs("mirror", &args.mirrors)?;
                let servers = pairs("server", &args.servers)?;
                let mut cas = pairs("ca", &args.cas)?;
                for (registry, file) in cas.iter_mut() {
                    *file = std::fs::read_to_string(&*file).with_context(|| {
                        format!("--ca {registry}={file}: cannot read the CA certificate")
                    })?;
                }
                let report =
                    pullthrough::node_agent::run_standalone(&options, &mirrors, &servers, &cas)
                        .await;
                if !report.failed.is_empty() {
                    anyhow::bail!(
                        "the files of {} registr(y/ies) could not be written",
                        report.failed.len()
                    );
                }
                return Ok(());
            }
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            let node = args
                .node_name
                .expect("clap requires it without --standalone");
            pullthrough::node_agent::run(
                client,
                options,
                node,
                args.metrics_listen,
                args.resync,
                shutdown_signal(),
            )
            .await?;
        }
        Role::Relay { listen, to } => {
            init_tracing(&cli.log_format);
            pullthrough::relay::run(listen, &to, shutdown_signal()).await?;
        }
        Role::Crd => print!("{}", pullthrough::api::mirror::crd_yaml()),
        Role::OpenshiftMirrorSets { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let mirror: pullthrough::api::mirror::RegistryMirror = serde_yaml::from_str(&text)
                .context("not a RegistryMirror (kubectl get registrymirror NAME -o yaml)")?;
            print!(
                "{}",
                pullthrough::api::mirror::openshift::mirror_sets(&mirror)?
            );
        }
        Role::Bundle(command) => {
            // The summary is the standard output; logs and progress go to standard error.
            init_tracing_to(&cli.log_format, true);
            bundle(command).await?;
        }
        Role::Cache(CacheCommand::Drop {
            image,
            tag,
            repository,
            admin,
            cache_dir,
        }) => {
            use pullthrough::proxy::admin::api::DropScope;
            pullthrough::api::image_ref::parse(&image)?;
            let scope = match (tag, repository) {
                (true, _) => DropScope::Tag,
                (_, true) => DropScope::Repository,
                _ => DropScope::Image,
            };
            let token_file = admin.admin_token_file.unwrap_or_else(|| {
                cache_dir.join(pullthrough::api::proxy_config::ADMIN_TOKEN_FILE)
            });
            let token = pullthrough::proxy::admin::read_token(&token_file)?;
            let answer =
                pullthrough::proxy::admin::drop(&admin.admin_url, scope, &image, &token).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
    }
    Ok(())
}

async fn bundle(command: BundleCommand) -> anyhow::Result<()> {
    use pullthrough::proxy::bundle;
    let open = |cache: &BundleCache| -> anyhow::Result<_> {
        let mut config = config_file(cache.config.as_deref())?;
        if let Some(d) = &cache.cache_dir {
            config.cache_dir = d.clone();
        }
        let scratch =
            std::env::temp_dir().join(format!("pullthrough-bundle-{}", std::process::id()));
        let opened = pullthrough::proxy::build::open_store_beside(&config, &scratch)?;
        Ok((opened, config, scratch))
    };
    match command {
        BundleCommand::Export {
            out,
            images,
            images_from,
            in_use,
            admin,
            cache,
        } => {
            let mut names = images;
            if let Some(file) = images_from {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                names.extend(
                    text.lines()
                        .map(|l| l.split('#').next().unwrap_or("").trim())
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
            let (opened, config, scratch) = open(&cache)?;
            if in_use {
                let token_file = admin
                    .admin_token_file
                    .unwrap_or_else(|| config.admin_token_path());
                let token = pullthrough::proxy::admin::read_token(&token_file)?;
                let used = pullthrough::proxy::admin::in_use(&admin.admin_url, &token).await?;
                if used.images.is_empty() {
                    anyhow::bail!("the proxy at {} knows no image in use", admin.admin_url);
                }
                names.extend(used.images);
            }
            let selection = if names.is_empty() {
                bundle::Selection::All
            } else {
                let parsed = names
                    .iter()
                    .map(|n| pullthrough::api::image_ref::parse(n))
                    .collect::<Result<Vec<_>, _>>()?;
                bundle::Selection::Images(parsed)
            };
            tracing::info!(cache = %opened.name, out = %out.display(), "exporting");
            let done = bundle::export(&*opened.store, &selection, &out).await;
            let _ = std::fs::remove_dir_all(&scratch);
            println!("{}", serde_json::to_string_pretty(&done?)?);
        }
        BundleCommand::Import {
            bundle: at,
            keep_tags,
            cache,
        } => {
            let (opened, _, scratch) = open(&cache)?;
            tracing::info!(cache = %opened.name, bundle = %at, "importing");
            let done = match bundle::seed::open(&at, opened.bucket.as_deref()).await {
                Ok((source, total)) => {
                    bundle::import(&*opened.store, source, total, keep_tags).await
                }
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_dir_all(&scratch);
            println!("{}", serde_json::to_string_pretty(&done?)?);
        }
    }
    Ok(())
}
