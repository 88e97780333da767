//! `__complete`: shell completion through kubectl. kubectl (1.26 and
//! later) completes `kubectl pcap ...` by running `kubectl_complete-pcap`
//! from the PATH with the words typed after `pcap`, the last one the word
//! being completed, and reads the answer in cobra's form: one candidate a
//! line (a tab, then what it is), then `:DIRECTIVE`. The launcher
//! `kubectl_complete-pcap` runs `kubectl pcap __complete "$@"`.
//!
//! Subcommands and flags come from the command line's own definition;
//! capture names (for the commands that take one, each with its phase),
//! namespaces (`-n`) and pods (`--pod`) from the cluster, with the
//! kubeconfig, context and user the typed words name; contexts
//! (`--context`) from the kubeconfig.

use std::process::ExitCode;
use std::time::Duration;

use clap::Command;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use kube::config::Kubeconfig;
use kube::{Api, ResourceExt as _};
use packet_capture_common::crd::PacketCaptureConfig;

use crate::cluster::Global;

/// Cobra's directives: let the shell complete file names, or not.
const FILES: u8 = 0;
const NO_FILES: u8 = 4;

/// How long a lookup in the cluster may hold up the shell.
const LOOKUP_WITHIN: Duration = Duration::from_secs(5);

/// The subcommands whose one positional argument is a capture's name.
const TAKE_A_CAPTURE: &[&str] = &["get", "stop", "delete", "fetch", "stream"];

/// The flags whose value is a file.
const FILE_VALUED: &[&str] = &["kubeconfig", "output"];

/// What is there to complete.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    /// These candidates, as they are.
    Words(Vec<(String, String)>),
    /// A capture's name.
    Capture,
    /// A namespace's name.
    Namespace,
    /// A pod: NAME in the namespace of `-n` or the context, or NS/NAME.
    Pod,
    /// A context of the kubeconfig.
    Context,
    /// A file name: the shell's own completion.
    File,
}

/// Answers kubectl's completion of `words` (the last one being completed).
pub async fn complete(cli: Command, words: Vec<String>) -> ExitCode {
    let (typed, word) = match words.split_last() {
        Some((word, typed)) => (typed.to_vec(), word.clone()),
        None => (Vec::new(), String::new()),
    };
    let (candidates, directive) = match wanted(&cli, &typed, &word) {
        Wanted::Words(words) => (words, NO_FILES),
        Wanted::File => (Vec::new(), FILES),
        lookup => (looked_up(lookup, &typed, &word).await, NO_FILES),
    };
    for (candidate, about) in candidates {
        if about.is_empty() {
            outln!("{candidate}");
        } else {
            outln!("{candidate}\t{about}");
        }
    }
    outln!(":{directive}");
    ExitCode::SUCCESS
}

/// What completes `word` after `typed`.
fn wanted(cli: &Command, typed: &[String], word: &str) -> Wanted {
    let sub = positionals(cli, None, typed).next().and_then(|w| {
        cli.get_subcommands().find(|s| {
            !s.is_hide_set() && (s.get_name() == w || s.get_all_aliases().any(|a| a == w))
        })
    });
    // The value of the flag before it.
    if let Some(flag) = typed.last().and_then(|w| flag_named(cli, sub, w))
        && takes_next_word(flag)
    {
        let values = flag.get_possible_values();
        if !values.is_empty() {
            let values = values
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| (v.get_name().to_owned(), first_line(v.get_help())));
            return Wanted::Words(starting_with(values, word));
        }
        return match flag.get_long().unwrap_or_default() {
            long if FILE_VALUED.contains(&long) => Wanted::File,
            "namespace" => Wanted::Namespace,
            "pod" => Wanted::Pod,
            "context" => Wanted::Context,
            _ => Wanted::Words(Vec::new()),
        };
    }
    if word.starts_with('-') {
        let flags = sub
            .into_iter()
            .flat_map(Command::get_arguments)
            .chain(cli.get_arguments())
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| Some((format!("--{}", a.get_long()?), first_line(a.get_help()))));
        return Wanted::Words(starting_with(flags, word));
    }
    match sub {
        None => {
            let subcommands = cli
                .get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| (s.get_name().to_owned(), first_line(s.get_about())));
            Wanted::Words(starting_with(subcommands, word))
        }
        // Its first positional word is the subcommand itself.
        Some(sub)
            if TAKE_A_CAPTURE.contains(&sub.get_name())
                && positionals(cli, Some(sub), typed).nth(1).is_none() =>
        {
            Wanted::Capture
        }
        Some(_) => Wanted::Words(Vec::new()),
    }
}

/// The flag `word` is (`--name`, `-n`), of `sub` or global.
fn flag_named<'a>(cli: &'a Command, sub: Option<&'a Command>, word: &str) -> Option<&'a clap::Arg> {
    let is = |a: &&clap::Arg| match (word.strip_prefix("--"), word.strip_prefix('-')) {
        (Some(long), _) => a.get_long() == Some(long),
        (None, Some(short)) => {
            let mut chars = short.chars();
            matches!((chars.next(), chars.next()), (Some(c), None) if a.get_short() == Some(c))
        }
        _ => false,
    };
    sub.into_iter()
        .flat_map(Command::get_arguments)
        .chain(cli.get_arguments())
        .find(is)
}

/// Whether `flag` takes the next word as its value (`--dry-run` takes one
/// only after `=`).
fn takes_next_word(flag: &clap::Arg) -> bool {
    flag.get_action().takes_values() && !flag.is_require_equals_set()
}

/// The words that are neither flags nor their values, flags of `sub` or
/// global.
fn positionals<'a>(
    cli: &'a Command,
    sub: Option<&'a Command>,
    words: &'a [String],
) -> impl Iterator<Item = &'a String> {
    let mut value_next = false;
    words.iter().filter(move |w| {
        if std::mem::take(&mut value_next) {
            return false;
        }
        if w.starts_with('-') {
            value_next = !w.contains('=') && flag_named(cli, sub, w).is_some_and(takes_next_word);
            return false;
        }
        true
    })
}

fn starting_with(
    candidates: impl Iterator<Item = (String, String)>,
    word: &str,
) -> Vec<(String, String)> {
    let mut out: Vec<_> = candidates.filter(|(c, _)| c.starts_with(word)).collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The first line of a help text, what a candidate is; empty without one.
fn first_line(help: Option<&clap::builder::StyledStr>) -> String {
    let text = help.map(ToString::to_string).unwrap_or_default();
    text.lines().next().unwrap_or_default().to_owned()
}

/// What the cluster (or the kubeconfig) has of `lookup` beginning with
/// `word`; nothing when it cannot be asked, within [`LOOKUP_WITHIN`].
async fn looked_up(lookup: Wanted, typed: &[String], word: &str) -> Vec<(String, String)> {
    let global = connection_flags(typed);
    let found = async {
        if lookup == Wanted::Context {
            let kubeconfig = match &global.kubeconfig {
                Some(path) => Kubeconfig::read_from(path),
                None => Kubeconfig::read(),
            };
            let contexts = kubeconfig.ok()?.contexts.into_iter();
            return Some(contexts.map(|c| (c.name, String::new())).collect());
        }
        let cluster = global.connect().await.ok()?;
        match lookup {
            Wanted::Capture => {
                let api = Api::<PacketCaptureConfig>::all(cluster.client);
                listed(api, "", |p| {
                    let phase = p.current_phase().map(|ph| format!("{ph:?}"));
                    phase.unwrap_or_default()
                })
                .await
            }
            Wanted::Namespace => {
                listed(Api::<Namespace>::all(cluster.client), "", |_| String::new()).await
            }
            Wanted::Pod => {
                let (namespace, prefix) = match word.split_once('/') {
                    Some((namespace, _)) => (namespace.to_owned(), format!("{namespace}/")),
                    None => (cluster.namespace, String::new()),
                };
                let api = Api::<Pod>::namespaced(cluster.client, &namespace);
                listed(api, &prefix, |p| {
                    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                    node.unwrap_or_default()
                })
                .await
            }
            _ => None,
        }
    };
    match tokio::time::timeout(LOOKUP_WITHIN, found).await {
        Ok(Some(found)) => starting_with(found.into_iter(), word),
        _ => Vec::new(),
    }
}

/// Each object `api` lists, by `prefix` and its name, with `about` it.
async fn listed<K>(
    api: Api<K>,
    prefix: &str,
    about: impl Fn(&K) -> String,
) -> Option<Vec<(String, String)>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let list = api.list(&ListParams::default()).await.ok()?;
    let named = list
        .items
        .iter()
        .map(|o| (format!("{prefix}{}", o.name_any()), about(o)));
    Some(named.collect())
}

/// The flags among the typed words that say which cluster to ask, and as
/// whom.
fn connection_flags(typed: &[String]) -> Global {
    let mut global = Global::default();
    let mut words = typed.iter();
    while let Some(w) = words.next() {
        let (flag, inline) = match w.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (w.as_str(), None),
        };
        let slot = match flag {
            "--kubeconfig" => None,
            "--context" => Some(&mut global.context),
            "--cluster" => Some(&mut global.cluster),
            "--user" => Some(&mut global.user),
            "--as" => Some(&mut global.as_user),
            "-n" | "--namespace" => Some(&mut global.namespace),
            _ => continue,
        };
        let Some(value) = inline.or_else(|| words.next().cloned()) else {
            break;
        };
        match slot {
            Some(slot) => *slot = Some(value),
            None => global.kubeconfig = Some(value.into()),
        }
    }
    global
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn wanted_after(typed: &[&str], word: &str) -> Wanted {
        let typed: Vec<String> = typed.iter().map(|w| (*w).to_owned()).collect();
        wanted(&crate::Cli::command(), &typed, word)
    }

    fn names(wanted: Wanted) -> Vec<String> {
        match wanted {
            Wanted::Words(words) => words.into_iter().map(|(w, _)| w).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subcommands_flags_and_names_complete_where_each_goes() {
        assert_eq!(names(wanted_after(&[], "st")), ["stop", "stream"]);
        assert!(names(wanted_after(&[], "")).contains(&"fetch".to_owned()));
        assert!(!names(wanted_after(&[], "")).contains(&"__complete".to_owned()));
        assert_eq!(wanted_after(&["get"], ""), Wanted::Capture);
        assert_eq!(
            wanted_after(&["--context", "a", "fetch"], "w"),
            Wanted::Capture
        );
        assert_eq!(wanted_after(&["fetch", "-o"], ""), Wanted::File);
        assert_eq!(wanted_after(&["get", "--kubeconfig"], ""), Wanted::File);
        assert_eq!(wanted_after(&["get", "web"], ""), Wanted::Words(Vec::new()));
        assert_eq!(
            wanted_after(&["stream", "--request-timeout", "5s"], ""),
            Wanted::Capture
        );
        assert_eq!(wanted_after(&["ls"], ""), Wanted::Words(Vec::new()));
        // A flag's value that is a subcommand's name is the value.
        assert_eq!(
            wanted_after(&["--context", "get", "ls"], ""),
            Wanted::Words(Vec::new())
        );
        assert_eq!(wanted_after(&["fetch", "-o", "web"], ""), Wanted::Capture);
        assert_eq!(
            wanted_after(&["create", "--duration"], ""),
            Wanted::Words(Vec::new())
        );
        let flags = names(wanted_after(&["fetch"], "--"));
        assert!(flags.contains(&"--output".to_owned()), "{flags:?}");
        assert!(flags.contains(&"--context".to_owned()), "{flags:?}");
        assert_eq!(
            names(wanted_after(&["create"], "--max-")),
            ["--max-packets"]
        );
        assert_eq!(wanted_after(&["create", "--pod"], "sh"), Wanted::Pod);
        assert_eq!(wanted_after(&["stream", "-n"], ""), Wanted::Namespace);
        assert_eq!(wanted_after(&["--context"], ""), Wanted::Context);
        // A flag's possible values.
        assert_eq!(
            names(wanted_after(&["create", "--format"], "pcap")),
            ["pcap", "pcapng"]
        );
        assert_eq!(
            names(wanted_after(&["stream", "--direction"], "")),
            ["both", "egress", "ingress"]
        );
        assert_eq!(names(wanted_after(&["ls", "-o"], "y")), ["yaml"]);
        // Its value only after `=`: the next word is not one.
        assert_eq!(
            wanted_after(&["create", "--dry-run"], "c"),
            Wanted::Words(Vec::new())
        );
    }

    #[test]
    fn the_typed_words_name_the_cluster() {
        let typed: Vec<String> = [
            "--kubeconfig=/k",
            "get",
            "--context",
            "c",
            "--user",
            "u",
            "-n",
            "shop",
        ]
        .iter()
        .map(|w| (*w).to_owned())
        .collect();
        let global = connection_flags(&typed);
        assert_eq!(
            global.kubeconfig.as_deref(),
            Some(std::path::Path::new("/k"))
        );
        assert_eq!(global.context.as_deref(), Some("c"));
        assert_eq!(global.user.as_deref(), Some("u"));
        assert_eq!(global.namespace.as_deref(), Some("shop"));
        assert_eq!(global.cluster, None);
    }
}
