//! `kubectl pcap`: packet captures from the command line, as a kubectl
//! plugin (the binary is `kubectl-pcap`; on the PATH, `kubectl pcap ...`
//! runs it).
//!
//! A capture stays declarative: `create` writes a `PacketCaptureConfig`
//! (`networking.packet.io/v1`, cluster-scoped, `kubectl get pcc`) that the
//! controller runs on the nodes, and every other command reads or changes
//! that object, so `kubectl` and GitOps see the same thing:
//!
//! ```text
//! kubectl pcap create web --pod shop/web-0 --port 443 --duration 5m --wait
//! kubectl pcap create web -n shop -l app=web --dry-run=client -o yaml
//! kubectl pcap ls -w
//! kubectl pcap get web
//! kubectl pcap stop web              # ends it now; it and its files stay
//! kubectl pcap fetch web -o web.pcapng
//! kubectl pcap stream web | tshark -r -
//! kubectl pcap stream --pod shop/web-0 | wireshark -k -i -
//! kubectl pcap extcap --install      # Wireshark's interface `kubernetes`
//! kubectl pcap delete web --wait
//! ```
//!
//! Files and streams come from the controller's aggregated API
//! (`pcap.packet.io/v1`) through the API server, with the kubeconfig's
//! credentials: `fetch` and `stream` need `get` on `captures/proxy` in that
//! group (a long-running subresource, so streams outlast the API server's
//! request timeout), and `get` on
//! `packetcaptureconfigs/files` in `networking.packet.io` for the capture.
//! A refusal is printed with the API server's message and the rule it
//! needs.
//!
//! `stop` annotates the capture (`networking.packet.io/stop-requested`):
//! the controller stops it on every node without starting it again (as a
//! change of the spec would), and the capture, its status and its files
//! stay for `get` and `fetch`. `fetch` refuses a capture that has not
//! ended, since a node lists a capture's file only once it has ended there:
//! `stop NAME --wait` first.
//!
//! `stream` with target flags makes its own capture and deletes it
//! afterwards; it exits 0 when the capture completes (1 when it failed or
//! its end is not known), on
//! Ctrl-C and when the reader of its output quits, and 143 on SIGTERM or
//! 129 on SIGHUP (after the deletion), as a shell reports a process ended
//! by it.
//!
//! The commands that only print (`ls`, `get`, `create`, `stop`, `delete`)
//! end quietly when the reader of their output quits (`kubectl pcap ls -o
//! yaml | head`).

/// `print!` to stdout; a reader that quit ends the command quietly (exit
/// 0), not with the panic `print!` makes of it. SIGPIPE stays ignored, as
/// Rust sets it: a connection the API server reset must fail a write, not
/// end the process.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cluster::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` as [`out!`] does `print!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cluster::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod capture;
mod cluster;
mod complete;
mod extcap;
mod fetch;
#[cfg(test)]
mod stand_in;
mod stream;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "kubectl-pcap", bin_name = "kubectl pcap", version)]
#[command(about = "Create, follow, stop and download packet captures (PacketCaptureConfigs)")]
struct Cli {
    #[command(flatten)]
    global: cluster::Global,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a capture: a PacketCaptureConfig the controller runs on the
    /// nodes
    Create(capture::CreateArgs),
    /// List the captures: phase, nodes, packets
    #[command(visible_alias = "list")]
    Ls(capture::ListArgs),
    /// Show a capture: its phase, message and each node's part
    Get(capture::GetArgs),
    /// End a running capture now, keeping it and its files
    Stop(capture::StopArgs),
    /// Delete a capture (the nodes stop capturing and keep its files)
    Delete(capture::DeleteArgs),
    /// Download every node's files of an ended capture, merged into one
    /// pcapng
    Fetch(fetch::FetchArgs),
    /// Write a capture's live pcapng stream to stdout (or make a capture
    /// for it, with the target flags, and delete it afterwards)
    Stream(stream::StreamArgs),
    /// Be Wireshark's extcap: its interface `kubernetes` is a capture's
    /// live stream (`--install` sets it up)
    Extcap(extcap::ExtcapArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // kubectl's completion of `kubectl pcap ...`: the words as typed, not
    // yet a command line clap would take (see `complete`).
    let mut args = std::env::args();
    if args.nth(1).as_deref() == Some("__complete") {
        return complete::complete(Cli::command(), args.collect()).await;
    }
    let cli = Cli::parse();
    let result = async {
        let command = match cli.command {
            // Wireshark asks most of its questions with no cluster at hand.
            Command::Extcap(args) => return extcap::run(&cli.global, args).await,
            command => command,
        };
        let cluster = cli.global.connect().await?;
        match command {
            Command::Create(args) => capture::create(&cluster, args).await,
            Command::Ls(args) => capture::list(&cluster, args).await,
            Command::Get(args) => capture::get(&cluster, args).await,
            Command::Stop(args) => capture::stop(&cluster, args).await,
            Command::Delete(args) => capture::delete(&cluster, args).await,
            Command::Fetch(args) => fetch::fetch(&cluster, args).await,
            Command::Stream(args) => stream::stream(&cluster, args).await,
            Command::Extcap(_) => unreachable!("answered above"),
        }
    }
    .await;
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_stream_takes_a_name_or_targets_not_both() {
        assert!(Cli::try_parse_from(["kubectl-pcap", "stream", "web"]).is_ok());
        assert!(Cli::try_parse_from(["kubectl-pcap", "stream", "--pod", "shop/web-0"]).is_ok());
        let err = Cli::try_parse_from(["kubectl-pcap", "stream", "web", "--pod", "shop/web-0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pod"), "{err}");
    }

    #[test]
    fn dry_run_needs_an_equals_sign_as_in_kubectl() {
        let cli = Cli::try_parse_from([
            "kubectl-pcap",
            "create",
            "web",
            "--ip",
            "10.0.0.1",
            "--dry-run=client",
            "-o",
            "yaml",
        ])
        .unwrap();
        let Command::Create(args) = cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(args.dry_run, Some(capture::DryRun::Client));
        let cli = Cli::try_parse_from([
            "kubectl-pcap",
            "create",
            "web",
            "--dry-run",
            "--ip",
            "1.2.3.4",
        ])
        .unwrap();
        let Command::Create(args) = cli.command else {
            panic!("{cli:?}");
        };
        assert_eq!(args.dry_run, Some(capture::DryRun::Client));
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from([
            "kubectl-pcap",
            "ls",
            "--context",
            "kind-a",
            "-n",
            "shop",
            "--request-timeout",
            "10s",
        ])
        .unwrap();
        assert_eq!(cli.global.context.as_deref(), Some("kind-a"));
        assert_eq!(cli.global.namespace.as_deref(), Some("shop"));
        assert_eq!(
            cli.global.request_timeout,
            std::time::Duration::from_secs(10)
        );
    }

    /// kubectl's impersonation flags; a group or uid only with a user.
    #[test]
    fn impersonation_is_kubectls() {
        let cli = Cli::try_parse_from([
            "kubectl-pcap",
            "ls",
            "--as",
            "Zoë",
            "--as-group",
            "équipe",
            "--as-group",
            "system:authenticated",
            "--as-uid",
            "7",
        ])
        .unwrap();
        assert_eq!(cli.global.as_user.as_deref(), Some("Zoë"));
        assert_eq!(cli.global.as_group, ["équipe", "system:authenticated"]);
        assert_eq!(cli.global.as_uid.as_deref(), Some("7"));
        for alone in [["--as-group", "g"], ["--as-uid", "7"]] {
            let err = Cli::try_parse_from(["kubectl-pcap", "ls", alone[0], alone[1]]).unwrap_err();
            assert!(err.to_string().contains("--as <USER>"), "{err}");
        }
    }
}
