//! The chart, the manifests and the Makefile against a real local
//! kube-apiserver (server-side validation, RBAC, make targets, helm install).

use std::sync::Mutex;

use xtask::cluster_checks::*;

/// The checks install and delete the same cluster-scoped objects.
static CLUSTER: Mutex<()> = Mutex::new(());

#[test]
fn chart_manifests_and_examples_pass_server_side_validation() {
    let Some(t) = test_tools("chart_manifests_and_examples_pass_server_side_validation") else {
        return;
    };
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let skipped = validate_server_side(&t).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("not served by this apiserver, checked client-side only: {skipped:?}");
    apply_examples(&t).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn service_accounts_can_do_what_they_need_and_nothing_more() {
    let Some(t) = test_tools("service_accounts_can_do_what_they_need_and_nothing_more") else {
        return;
    };
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let wrong = check_rbac(&t).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
}

#[test]
fn make_targets_operate_the_installation() {
    let Some(t) = test_tools("make_targets_operate_the_installation") else {
        return;
    };
    let _one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    check_make_targets(&t).unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn helm_installs_and_uninstalls_as_the_readme_says() {
    // On a cluster of its own: a fresh one, as the README's reader has.
    let Some((_cluster, t)) = fresh_cluster("helm_installs_and_uninstalls_as_the_readme_says")
    else {
        return;
    };
    check_helm_install(&t).unwrap_or_else(|e| panic!("{e:#}"));
}
