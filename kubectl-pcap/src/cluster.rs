//! The flags kubectl has for every command, the client they make, and the
//! signals that end a command early.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use futures::{Stream, StreamExt};
use http::{HeaderName, HeaderValue};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use kubectl_pcap::api::{Backoff, explain_crd, in_a_line};
use kubectl_pcap::spec::parse_duration;
use packet_capture_common::crd::PacketCaptureConfig;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Args, Debug, Default)]
pub struct Global {
    /// The kubeconfig file (default: $KUBECONFIG, or ~/.kube/config, or the
    /// pod's service account)
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Global options"
    )]
    pub context: Option<String>,

    /// The kubeconfig cluster to use, in place of the context's
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Global options"
    )]
    pub cluster: Option<String>,

    /// The kubeconfig user to use, in place of the context's
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Global options"
    )]
    pub user: Option<String>,

    /// The namespace of `--pod NAME` and of `--selector` (default: the
    /// context's)
    #[arg(
        short = 'n',
        long,
        global = true,
        value_name = "NAMESPACE",
        help_heading = "Global options"
    )]
    pub namespace: Option<String>,

    /// How long to wait for the API server on each read before giving up
    /// (1s, 2m, 3h; a stream of packets counts its quiet gaps); 0 waits
    /// forever
    #[arg(
        long,
        global = true,
        value_name = "DURATION",
        default_value = "0",
        value_parser = parse_timeout,
        help_heading = "Global options"
    )]
    pub request_timeout: Duration,

    /// The user to act as (kubectl's impersonation: your user needs
    /// `impersonate` on it)
    #[arg(
        long = "as",
        global = true,
        value_name = "USER",
        help_heading = "Global options"
    )]
    pub as_user: Option<String>,

    /// A group to act as, with --as (repeatable)
    #[arg(
        long,
        global = true,
        value_name = "GROUP",
        requires = "as_user",
        help_heading = "Global options"
    )]
    pub as_group: Vec<String>,

    /// The uid to act as, with --as
    #[arg(
        long,
        global = true,
        value_name = "UID",
        requires = "as_user",
        help_heading = "Global options"
    )]
    pub as_uid: Option<String>,
}

/// kubectl's `--request-timeout`: a duration, `0` for none.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let number = s.strip_suffix('s').unwrap_or(s);
    if !number.is_empty() && number.bytes().all(|b| b == b'0') {
        return Ok(Duration::ZERO);
    }
    parse_duration(s).map(|secs| Duration::from_secs(secs.into()))
}

/// A client and the namespace that completes pod names.
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
}

impl Cluster {
    /// Captures are cluster-scoped.
    pub fn captures(&self) -> Api<PacketCaptureConfig> {
        Api::all(self.client.clone())
    }
}

impl Global {
    /// The client the kubeconfig (or the pod's service account) describes.
    /// Nothing is sent until a command asks.
    pub async fn connect(&self) -> Result<Cluster> {
        let config = self.config().await?;
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).context("making the Kubernetes client")?;
        Ok(Cluster { client, namespace })
    }

    /// What the flags and the kubeconfig say to connect to, and as whom.
    async fn config(&self) -> Result<Config> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            cluster: self.cluster.clone(),
            user: self.user.clone(),
        };
        let chosen =
            options.context.is_some() || options.cluster.is_some() || options.user.is_some();
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &options).await?
            }
            None if chosen => Config::from_kubeconfig(&options).await?,
            None => Config::infer().await?,
        };
        if let Some(user) = &self.as_user {
            config.headers.extend(self.impersonation(user)?);
            // In place of the kubeconfig's own `as`, as kubectl does.
            let auth = &mut config.auth_info;
            auth.impersonate = None;
            auth.impersonate_groups = None;
            auth.impersonate_uid = None;
            auth.impersonate_user_extra = None;
        }
        let timeout = (!self.request_timeout.is_zero()).then_some(self.request_timeout);
        config.read_timeout = timeout;
        config.write_timeout = timeout;
        Ok(config)
    }

    /// The headers that act as `user` and the --as-group and --as-uid
    /// given: names as they are, UTF-8 too, as kubectl sends them.
    fn impersonation(&self, user: &str) -> Result<Vec<(HeaderName, HeaderValue)>> {
        let header = |name: &'static str, flag: &str, value: &str| {
            HeaderValue::from_bytes(value.as_bytes())
                .map(|value| (HeaderName::from_static(name), value))
                .with_context(|| format!("{flag} {value:?}: not a header value"))
        };
        let mut headers = vec![header("impersonate-user", "--as", user)?];
        for group in &self.as_group {
            headers.push(header("impersonate-group", "--as-group", group)?);
        }
        if let Some(uid) = &self.as_uid {
            headers.push(header("impersonate-uid", "--as-uid", uid)?);
        }
        Ok(headers)
    }
}

/// A watch that outlasts what the API server recovers from (a dropped or
/// timed-out connection, a restart, an expired resource version, a 5xx):
/// it says so on stderr and watches again after a backoff. What is an
/// answer about the request itself (no permission, no such resource type)
/// ends it.
pub fn lasting<S, T>(watch: S) -> impl Stream<Item = Result<T>>
where
    S: Stream<Item = Result<T, watcher::Error>>,
{
    watch.default_backoff().filter_map(|item| async move {
        match item {
            Ok(v) => Some(Ok(v)),
            Err(e) if passing(&e) => {
                eprintln!("warning: {}; watching again", watch_error(e));
                None
            }
            Err(e) => Some(Err(watch_error(e))),
        }
    })
}

/// Sends a request (`send`) until it is answered, fails for good (not
/// [`transient`]), or `backoff` has no pause left: each failure that may
/// pass is said on stderr (`what` failed), with the pause before the next
/// try. So a command rides out an API server or a controller that
/// restarts.
pub async fn persisting<T, F>(
    what: &str,
    backoff: &mut Backoff,
    mut send: impl FnMut() -> F,
) -> std::result::Result<T, kube::Error>
where
    F: std::future::Future<Output = std::result::Result<T, kube::Error>>,
{
    loop {
        match send().await {
            Err(e) if transient(&e) => {
                let Some(pause) = backoff.next_pause() else {
                    return Err(e);
                };
                eprintln!("{what}: {}: asking again in {pause:?}", in_a_line(&e));
                tokio::time::sleep(pause).await;
            }
            answered => return answered,
        }
    }
}

/// Whether a watch's error may pass (see [`transient`]).
fn passing(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => transient(e),
        watcher::Error::WatchError(s) => passing_code(s.code),
        watcher::Error::NoResourceVersion => true,
    }
}

/// Whether a request's error may pass, so that asking again may succeed: a
/// lost connection, or an answer other than a client error (4xx), except a
/// timeout, an expired resource version or throttling. Not the request's or
/// the credentials' own failures: the same again would fail again.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => passing_code(s.code),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

fn passing_code(code: u16) -> bool {
    !(400..500).contains(&code) || matches!(code, 408 | 410 | 429)
}

/// A watch that failed, explained with the RBAC it needs.
pub fn watch_error(e: watcher::Error) -> anyhow::Error {
    let e = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(status) => kube::Error::Api(status),
        other => return anyhow::Error::new(other),
    };
    anyhow::anyhow!(explain_crd(&e, &["list", "watch"]))
}

/// Writes to stdout, for the macros `out!` and `outln!` (main.rs).
pub fn write_stdout(text: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// How a command was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP: the terminal or session went away.
    HangUp,
}

impl Stop {
    /// The exit status of a process ended by this signal, as a shell
    /// reports it.
    pub fn status(self) -> u8 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
            Self::HangUp => 129,
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from creation on: a signal that
/// arrives while a command is between steps is seen at its next wait.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hang_up: Signal,
}

impl Signals {
    pub fn new() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            hang_up: signal(SignalKind::hangup()).context("catching SIGHUP")?,
        })
    }

    /// Waits for a SIGINT; other signals pass.
    pub async fn interrupted(&mut self) {
        while self.recv().await != Stop::Interrupt {}
    }

    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
            _ = self.hang_up.recv() => Stop::HangUp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_rides_out_what_the_api_server_recovers_from() {
        let status = |code| kube::core::Status::failure("", "").with_code(code).boxed();
        let api = |code| kube::Error::Api(status(code));
        for (e, passes) in [
            (watcher::Error::WatchFailed(api(500)), true),
            (watcher::Error::WatchFailed(api(503)), true),
            (watcher::Error::WatchError(status(410)), true),
            (watcher::Error::WatchStartFailed(api(429)), true),
            (watcher::Error::InitialListFailed(api(408)), true),
            (watcher::Error::NoResourceVersion, true),
            (watcher::Error::InitialListFailed(api(403)), false),
            (watcher::Error::InitialListFailed(api(404)), false),
            (watcher::Error::WatchStartFailed(api(401)), false),
            (watcher::Error::WatchError(status(400)), false),
            (
                watcher::Error::WatchFailed(kube::Error::ReadEvents(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                true,
            ),
            (
                watcher::Error::WatchFailed(kube::Error::SerdeError(
                    serde_json::from_str::<u8>("not an event").unwrap_err(),
                )),
                false,
            ),
        ] {
            assert_eq!(passing(&e), passes, "{e:?}");
        }
    }

    /// --context, --cluster and --user pick from the kubeconfig as kubectl
    /// does; --as acts as another user in place of the kubeconfig's `as`.
    #[tokio::test]
    async fn the_flags_pick_the_cluster_and_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            r#"apiVersion: v1
kind: Config
clusters:
  - name: a
    cluster: {server: "https://a.example:6443"}
  - name: b
    cluster: {server: "https://b.example:6443"}
users:
  - name: alice
    user: {username: alice, password: x}
  - name: bob
    user: {username: bob, password: y, as: carol}
contexts:
  - name: ctx
    context: {cluster: a, user: alice, namespace: shop}
current-context: ctx
"#,
        )
        .unwrap();
        let with = |cluster: Option<&str>, user: Option<&str>, as_user: Option<&str>| Global {
            kubeconfig: Some(path.clone()),
            cluster: cluster.map(Into::into),
            user: user.map(Into::into),
            as_user: as_user.map(Into::into),
            ..Default::default()
        };
        let picked = |global: Global| async move {
            let config = global.config().await.unwrap();
            let impersonated: Vec<_> = config
                .headers
                .iter()
                .filter(|(name, _)| name == "impersonate-user")
                .map(|(_, value)| value.to_str().unwrap().to_owned())
                .collect();
            (
                config.cluster_url.host().unwrap().to_owned(),
                config.auth_info.username.unwrap(),
                config.auth_info.impersonate,
                impersonated,
                config.default_namespace,
            )
        };
        let none = Vec::<String>::new();
        assert_eq!(
            picked(with(None, None, None)).await,
            (
                "a.example".into(),
                "alice".into(),
                None,
                none.clone(),
                "shop".into()
            )
        );
        assert_eq!(picked(with(Some("b"), None, None)).await.0, "b.example");
        let bob = picked(with(None, Some("bob"), None)).await;
        assert_eq!((bob.0.as_str(), bob.1.as_str()), ("a.example", "bob"));
        assert_eq!(bob.2.as_deref(), Some("carol"));
        let as_dave = picked(with(None, Some("bob"), Some("dave"))).await;
        assert_eq!((as_dave.2, as_dave.3), (None, vec!["dave".to_owned()]));
        let unknown = with(Some("nowhere"), None, None)
            .config()
            .await
            .unwrap_err();
        assert!(format!("{unknown:#}").ends_with(": nowhere"), "{unknown:#}");
    }

    #[test]
    fn a_zero_timeout_waits_forever() {
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_timeout("").is_err());
        assert!(parse_timeout("s").is_err());
        assert!(parse_timeout("soon").is_err());
    }
}
