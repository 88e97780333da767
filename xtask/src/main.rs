//! `cargo xtask <task>`: the project's chores, in Rust so they run wherever
//! cargo does.

use clap::{Parser, Subcommand};
use xtask::{bench, cluster, crdgen, cross, demo, ebpf, images, manifests, setup};

#[derive(Parser)]
#[command(about = "packet-capture project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build the eBPF object alone and print its path and size.
    BuildEbpf,
    /// Write the CRD YAML generated from the Rust types.
    Crdgen {
        /// Fail if the committed YAML differs from the generated one.
        #[arg(long)]
        check: bool,
    },
    /// Render the Helm chart into manifests/ (the paths of the README's
    /// `kubectl apply` sequence) and check manifests/sample-config.yaml.
    Manifests {
        /// Fail if the committed manifests differ from the chart.
        #[arg(long)]
        check: bool,
    },
    /// Cross-compile the agent and controller for arm64 (the arm64 images'
    /// binaries) and check the architecture of what was built.
    CrossCheck {
        /// Build with the release profile, as the images do.
        #[arg(long)]
        release: bool,
    },
    /// Build the agent and controller images from the Dockerfile with
    /// buildah (no Docker) into OCI archives under target/images/, for
    /// linux/amd64 and linux/arm64; `--load` imports them into containerd.
    Images(images::Args),
    /// A local control plane with simulated nodes: up, down, status.
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Run the whole system on a local control plane and show a capture.
    Demo,
    /// Measure the agent against tcpdump on the same traffic (as root);
    /// `--out docs/benchmarks.md` writes the report and its plots.
    /// `bench controller` measures the controller on many nodes.
    Bench(bench::Cli),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::install(),
        Task::BuildEbpf => ebpf::build(),
        Task::Crdgen { check } => crdgen::run(check),
        Task::Manifests { check } => manifests::run(check),
        Task::CrossCheck { release } => cross::run(release),
        Task::Images(args) => images::run_cli(args),
        Task::Cluster(command) => cluster::run(command),
        Task::Demo => demo::run_demo(),
        Task::Bench(cli) => bench::run_command(cli),
    }
}
