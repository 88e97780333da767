//! `extcap`: kubectl-pcap as a Wireshark extcap, so that Wireshark (and
//! tshark) list an interface `kubernetes` whose packets are a capture's
//! live stream, as `stream` writes it.
//!
//! `kubectl pcap extcap --install [DIR]` writes a launcher into Wireshark's
//! personal extcap folder; Wireshark then runs it with its own flags
//! (`--extcap-interfaces`, `--extcap-dlts`, `--extcap-config`, and
//! `--capture --fifo PATH`). The interface's options, set in Wireshark's
//! dialog or with `tshark -o extcap.kubernetes.<option>:<value>`, are
//! `stream`'s: an existing capture's name, or pods (`NS/NAME`, comma
//! separated) or a label selector for a capture made for the stream and
//! deleted when it ends; the capture filter is the capture's `filter`. The
//! stream goes into the FIFO Wireshark reads, and ends, deleting a capture
//! it made, when Wireshark stops the capture. What `stream` tells on stderr
//! reaches Wireshark only when the stream failed.

use std::io::Write as _;
use std::os::fd::{AsFd as _, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser};

use crate::cluster::Global;
use crate::stream::{self, StreamArgs};

/// The one interface: a capture's live stream.
pub const INTERFACE: &str = "kubernetes";

/// The launcher's name in the extcap folder.
const LAUNCHER: &str = "kubectl-pcap";

#[derive(Args, Debug)]
pub struct ExtcapArgs {
    /// Write the launcher Wireshark runs into DIR (default: Wireshark's
    /// personal extcap folder, ~/.local/lib/wireshark/extcap, read by
    /// Wireshark 4.2 and later; older ones read the "Extcap path" that
    /// `tshark -G folders` shows, or $WIRESHARK_EXTCAP_DIR)
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub install: Option<Option<PathBuf>>,

    #[arg(long, hide = true)]
    pub extcap_interfaces: bool,
    #[arg(long, hide = true)]
    pub extcap_version: Option<String>,
    #[arg(long, hide = true)]
    pub extcap_interface: Option<String>,
    #[arg(long, hide = true)]
    pub extcap_dlts: bool,
    #[arg(long, hide = true)]
    pub extcap_config: bool,
    #[arg(long, hide = true)]
    pub capture: bool,
    #[arg(long, hide = true)]
    pub fifo: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub extcap_capture_filter: Option<String>,

    /// The interface's options (see `--extcap-config`).
    #[arg(long, hide = true)]
    pub capture_name: Option<String>,
    #[arg(long, hide = true)]
    pub pods: Option<String>,
    #[arg(long, hide = true)]
    pub selector: Option<String>,
    #[arg(long, hide = true)]
    pub duration: Option<String>,
    #[arg(long, hide = true)]
    pub labels: Option<String>,
}

/// What Wireshark asked for.
pub async fn run(global: &Global, args: ExtcapArgs) -> Result<ExitCode> {
    if let Some(dir) = &args.install {
        let launcher = install(dir.as_deref())?;
        eprintln!(
            "wrote {}: Wireshark lists the interface {INTERFACE} once it reads that folder",
            launcher.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.extcap_interfaces {
        outln!(
            "extcap {{version={}}}{{help={HELP}}}",
            env!("CARGO_PKG_VERSION")
        );
        outln!("interface {{value={INTERFACE}}}{{display=Kubernetes pods (kubectl pcap)}}");
        return Ok(ExitCode::SUCCESS);
    }
    match args.extcap_interface.as_deref() {
        Some(INTERFACE) => {}
        Some(other) => bail!("--extcap-interface {other}: the one interface is {INTERFACE}"),
        None => bail!(
            "extcap: Wireshark's calls need --extcap-interface; `kubectl pcap extcap --install` \
             sets it up"
        ),
    }
    if args.extcap_dlts {
        // The stream is pcapng, whose interfaces say their own link types;
        // Wireshark needs one named here.
        outln!("dlt {{number=1}}{{name=EN10MB}}{{display=Ethernet}}");
        return Ok(ExitCode::SUCCESS);
    }
    if args.extcap_config {
        for line in CONFIG {
            outln!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.capture {
        // Wireshark checks a capture filter so, before a capture: the
        // webhook checks it when the capture is made.
        return Ok(ExitCode::SUCCESS);
    }
    let Some(fifo) = &args.fifo else {
        bail!("--capture needs --fifo");
    };
    let stream_args = stream_args(&args)?;
    let cluster = global.connect().await?;
    into_stdout(fifo)?;
    let said = Held::stderr()?;
    let streamed = stream::stream(&cluster, stream_args).await;
    if !matches!(streamed, Ok(ExitCode::SUCCESS)) {
        said.release();
    }
    streamed
}

/// What the stream says on stderr (the capture it made, how it ended),
/// held back: Wireshark shows anything an extcap writes there as an
/// error. It goes out when the stream failed, to say why.
struct Held {
    stderr: OwnedFd,
    said: std::fs::File,
}

impl Held {
    fn stderr() -> Result<Self> {
        let said = tempfile::tempfile().context("a file to hold stderr")?;
        let stderr = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("keeping stderr")?;
        redirect(&said, libc::STDERR_FILENO).context("holding stderr")?;
        Ok(Self { stderr, said })
    }

    /// Stderr back, with what was held.
    fn release(mut self) {
        use std::io::{Read as _, Seek as _};
        let _ = redirect(&self.stderr, libc::STDERR_FILENO);
        let mut said = String::new();
        let _ = self.said.rewind();
        let _ = self.said.read_to_string(&mut said);
        eprint!("{said}");
    }
}

/// Points descriptor `to` at what `from` is open on.
fn redirect(from: &impl AsRawFd, to: libc::c_int) -> std::io::Result<()> {
    // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
    if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const HELP: &str = "https://github.com/packet-capture/packet-capture#kubectl-pcap-in-wireshark";

/// The interface's options, as Wireshark's dialog shows them.
const CONFIG: &[&str] = &[
    "arg {number=0}{call=--capture-name}{display=Capture}{type=string}\
     {tooltip=An existing capture (PacketCaptureConfig) to stream; empty: one is made from \
     the options below, and deleted when the capture in Wireshark stops}{group=Capture}",
    "arg {number=1}{call=--pods}{display=Pods}{type=string}\
     {tooltip=Pods to capture: NAMESPACE/NAME, or NAME in the namespace below, comma separated}\
     {group=Capture}",
    "arg {number=2}{call=--selector}{display=Label selector}{type=string}\
     {tooltip=Pods to capture by their labels, key=value[,key=value...]}{group=Capture}",
    "arg {number=3}{call=--namespace}{display=Namespace}{type=string}\
     {tooltip=The namespace of pod names and of the selector (default: the context's)}\
     {group=Capture}",
    "arg {number=4}{call=--duration}{display=Duration}{type=string}\
     {tooltip=How long a capture made for the stream runs: 30s, 5m, 1h (default 5m)}\
     {group=Capture}",
    "arg {number=5}{call=--labels}{display=Capture labels}{type=string}\
     {tooltip=Labels of a capture made for the stream, key=value[,key=value...] (a controller \
     started with --capture-selector runs only those its selector matches)}{group=Capture}",
    "arg {number=6}{call=--context}{display=Context}{type=string}\
     {tooltip=The kubeconfig context (default: the current one)}{group=Cluster}",
    "arg {number=7}{call=--kubeconfig}{display=Kubeconfig}{type=fileselect}{mustexist=true}\
     {tooltip=The kubeconfig file (default: $KUBECONFIG, or ~/.kube/config)}{group=Cluster}",
];

/// An option Wireshark passed with something in it.
fn given(option: &Option<String>) -> Option<&str> {
    option.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// `stream`'s arguments for the interface's options, checked as
/// `kubectl pcap stream` checks its flags.
fn stream_args(args: &ExtcapArgs) -> Result<StreamArgs> {
    #[derive(Parser)]
    struct Stream {
        #[command(flatten)]
        args: StreamArgs,
    }
    let mut argv = vec!["kubectl pcap stream".to_owned()];
    argv.extend(given(&args.capture_name).map(str::to_owned));
    for pod in given(&args.pods).into_iter().flat_map(|p| p.split(',')) {
        argv.extend(["--pod".to_owned(), pod.trim().to_owned()]);
    }
    if let Some(selector) = given(&args.selector) {
        argv.extend(["--selector".to_owned(), selector.to_owned()]);
    }
    if let Some(duration) = given(&args.duration) {
        argv.extend(["--duration".to_owned(), duration.to_owned()]);
    }
    if let Some(labels) = given(&args.labels) {
        argv.extend(["--labels".to_owned(), labels.to_owned()]);
    }
    if let Some(filter) = given(&args.extcap_capture_filter) {
        argv.extend(["--filter".to_owned(), filter.to_owned()]);
    }
    Ok(Stream::try_parse_from(argv)?.args)
}

/// Makes the FIFO Wireshark reads this process's stdout, where `stream`
/// writes, and watches for its reader to go.
fn into_stdout(fifo: &Path) -> Result<()> {
    // Opening a FIFO waits for its reader: Wireshark has it open already.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(fifo)
        .with_context(|| format!("opening the FIFO {}", fifo.display()))?;
    redirect(&file, libc::STDOUT_FILENO).context("making the FIFO stdout")
}

/// Writes the launcher into `dir` (default: the personal extcap folder)
/// and returns its path.
fn install(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(dir) => dir.to_owned(),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set: name the folder")?;
            PathBuf::from(home).join(".local/lib/wireshark/extcap")
        }
    };
    let me = std::env::current_exe().context("finding this kubectl-pcap")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let launcher = dir.join(LAUNCHER);
    let mut file = std::fs::File::create(&launcher)
        .with_context(|| format!("creating {}", launcher.display()))?;
    file.write_all(launcher_script(&me).as_bytes())?;
    file.set_permissions(std::fs::Permissions::from_mode(0o755))?;
    Ok(launcher)
}

/// The launcher: this binary's `extcap`, with Wireshark's arguments.
fn launcher_script(binary: &Path) -> String {
    let quoted = binary.display().to_string().replace('\'', r"'\''");
    format!(
        "#!/bin/sh\n\
         # Wireshark's extcap launcher of kubectl pcap (`kubectl pcap extcap --install`).\n\
         exec '{quoted}' extcap \"$@\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Extcap {
        #[command(flatten)]
        args: ExtcapArgs,
    }

    fn args(options: &[(&str, &str)]) -> ExtcapArgs {
        let mut argv = vec!["extcap".to_owned(), "--capture".to_owned()];
        for (flag, value) in options {
            argv.extend([format!("--{flag}"), (*value).to_owned()]);
        }
        Extcap::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn install_takes_a_folder_or_none() {
        let parsed = |argv: &[&str]| Extcap::try_parse_from(argv).unwrap().args.install;
        assert_eq!(parsed(&["extcap"]), None);
        assert_eq!(parsed(&["extcap", "--install"]), Some(None));
        assert_eq!(
            parsed(&["extcap", "--install", "/x"]),
            Some(Some(PathBuf::from("/x")))
        );
        let dir = tempfile::tempdir().unwrap();
        let launcher = install(Some(&dir.path().join("extcap"))).unwrap();
        let mode = std::fs::metadata(&launcher).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn the_options_are_streams_flags() {
        let made = stream_args(&args(&[
            ("pods", "shop/web-0, web-1"),
            ("duration", "2m"),
            ("extcap-capture-filter", "tcp port 443"),
            ("capture-name", " "),
        ]))
        .unwrap();
        assert_eq!(made.name, None);
        assert_eq!(made.target.pods, ["shop/web-0", "web-1"]);
        assert_eq!(made.target.duration, Some(120));
        assert_eq!(made.target.filter, "tcp port 443");
        let named = stream_args(&args(&[("capture-name", "web")])).unwrap();
        assert_eq!(named.name.as_deref(), Some("web"));
        // An existing capture has its own targets and filter.
        let both = stream_args(&args(&[("capture-name", "web"), ("selector", "app=web")]));
        assert!(both.is_err());
        let bad = stream_args(&args(&[("duration", "soon")])).unwrap_err();
        assert!(bad.to_string().contains("--duration"), "{bad}");
    }

    #[test]
    fn the_launcher_runs_this_binary_whatever_its_path() {
        let script = launcher_script(Path::new("/opt/it's here/kubectl-pcap"));
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        let out = std::process::Command::new("sh")
            .args(["-c", &script.replace("exec ", "printf '%s|' "), "sh", "a b"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/opt/it's here/kubectl-pcap|extcap|a b|"
        );
    }
}
