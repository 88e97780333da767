//! The reconciler: `PacketCaptureConfig` → captures on the agents → status.
//!
//! Each pass gathers what the caches and the [`Tracker`] know, lets
//! [`plan`](crate::plan) decide, has [`act`](crate::act) carry the decisions
//! out, and has [`report`](crate::report) write the status from what the
//! `WatchCapture` tasks of the tracker report. This module also holds the
//! [`Context`] and runs the kube-rs `Controller` with its watches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::{AUTHORIZED_IN, PacketCaptureConfig, STOP_REQUESTED};

use crate::act::{Act, RETARGET_RETRY};
use crate::agent_certs;
use crate::agents::{AgentPool, AgentTls, PoolSettings, TrustedCas};
use crate::config::{AgentCa, Settings, Timing};
use crate::consts::{FIELD_MANAGER, FINALIZER};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::plan::{self, Clear, Inputs, Next, Resource};
use crate::report::{Report, StatusWrites};
use crate::status;
use crate::targets::{self, Caches, Granted};
use crate::tracker::{OWED_SWEEP_RETRY, Tracker};

/// Everything reconcile needs.
pub struct Context {
    pub client: Client,
    pub events: Events,
    /// All pods (targets and agents), nodes and namespaces.
    pub caches: Caches,
    pub agents: Arc<AgentPool>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    pub status_writes: StatusWrites,
    /// Where the results ConfigMaps go.
    pub namespace: String,
    pub timing: Timing,
}

/// What a [`Context`] is made of besides the client and caches.
pub struct ContextSettings {
    pub pool: PoolSettings,
    /// Where the results ConfigMaps go.
    pub namespace: String,
    /// This replica's name in Events.
    pub identity: String,
    pub timing: Timing,
}

impl Context {
    /// A context, and the reconcile requests its tracker makes (for
    /// `Controller::reconcile_on`).
    pub fn new(
        client: Client,
        caches: Caches,
        settings: ContextSettings,
        metrics: Arc<Metrics>,
    ) -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<ObjectRef<PacketCaptureConfig>>,
    ) {
        let agents = Arc::new(AgentPool::new(
            caches.pods.clone(),
            caches.nodes.clone(),
            settings.pool,
            metrics.clone(),
        ));
        let (trigger, triggers) = mpsc::unbounded();
        let ctx = Self {
            events: Events::new(client.clone(), settings.identity),
            client,
            caches,
            agents,
            tracker: Tracker::new(trigger),
            metrics,
            status_writes: StatusWrites::default(),
            namespace: settings.namespace,
            timing: settings.timing,
        };
        (Arc::new(ctx), triggers)
    }

    fn act<'a>(&'a self, resource: Resource<'a>) -> Act<'a> {
        Act {
            resource,
            pool: &self.agents,
            tracker: &self.tracker,
            events: &self.events,
            timing: &self.timing,
        }
    }

    fn report<'a>(&'a self, resource: Resource<'a>) -> Report<'a> {
        Report {
            resource,
            client: &self.client,
            events: &self.events,
            metrics: &self.metrics,
            writes: &self.status_writes,
            namespace: &self.namespace,
        }
    }
}

/// Whether the status says the current generation has ended.
pub fn is_done(pcc: &PacketCaptureConfig) -> bool {
    let generation = pcc.metadata.generation.unwrap_or_default();
    status::final_phase(pcc.status.as_ref(), generation).is_some()
}

/// Reconciles one `PacketCaptureConfig`, inside the finalizer.
pub async fn reconcile(pcc: Arc<PacketCaptureConfig>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled();
    // Until the caches are filled every pod would look missing.
    let _ = ctx.caches.pods.wait_until_ready().await;
    let _ = ctx.caches.nodes.wait_until_ready().await;
    let _ = ctx.caches.namespaces.wait_until_ready().await;
    let api: Api<PacketCaptureConfig> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, pcc, |event| async {
        match event {
            Finalizer::Apply(pcc) => apply(Resource::new(&pcc)?, &ctx).await,
            Finalizer::Cleanup(pcc) => cleanup(Resource::new(&pcc)?, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Logs and counts a failed reconcile, and tries again later.
pub fn error_policy(pcc: Arc<PacketCaptureConfig>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %pcc.name_any(), "reconcile failed: {err}");
    ctx.metrics.reconcile_failed(err);
    Action::requeue(ctx.timing.error_requeue)
}

/// One pass over a live resource: plan, act, report.
async fn apply(resource: Resource<'_>, ctx: &Context) -> Result<Action> {
    let Resource {
        pcc,
        uid,
        generation,
    } = resource;
    let endpoints = ctx.agents.endpoints();
    let unready = ctx.agents.unready();
    // Nodes whose agent is on its way are capture nodes too: they wait.
    let agent_nodes = endpoints.keys().chain(unready.keys()).cloned().collect();
    let authorized = pcc
        .annotations()
        .get(AUTHORIZED_IN)
        .map(|v| Granted::parse(v));
    let targets = targets::resolve(&pcc.spec, authorized.as_ref(), &ctx.caches, &agent_nodes);
    // Status entries are keyed by the address the node's start reports.
    let node_ips: BTreeMap<String, String> = targets
        .nodes
        .keys()
        .map(|n| {
            let ip = endpoints
                .get(n)
                .map_or_else(|| ctx.agents.node_ip(n), |e| e.node_ip.clone());
            (n.clone(), ip)
        })
        .collect();
    let act = ctx.act(resource);
    let mut tracked = ctx.tracker.nodes(uid, generation);
    if plan::must_list(&resource, &tracked) {
        act.adopt_listed(&endpoints).await;
        tracked = ctx.tracker.nodes(uid, generation);
    }
    let earlier = ctx.tracker.other_generations(uid, generation);
    let no_agent = ctx.agents.settings().no_agent();
    let plan = plan::plan(&Inputs {
        resource,
        targets: &targets,
        agents: &endpoints,
        unready: &unready,
        node_ips: &node_ips,
        tracked: &tracked,
        earlier: &earlier,
        no_agent: &no_agent,
        grace: ctx.timing.grace,
        agent_wait: ctx.timing.agent_wait,
        now: Timestamp::now(),
    });

    let report = ctx.report(resource);
    if let Some(value) = &plan.stale_stop {
        // Before anything acts: were it left, the next pass would stop the
        // generation this one starts.
        drop_stale_stop(ctx, resource, value).await?;
    }
    if plan.forget_earlier {
        act.forget_earlier();
    }
    act.clear_and_settle(&plan.clear, &endpoints, &unready)
        .await;
    // A capture with nothing else to wait for comes back for what the
    // nodes still owe (a start's sweep may owe one too: asked once done).
    let owing = || !ctx.tracker.owed_sweeps(uid).is_empty();
    let done = || {
        if owing() {
            Action::requeue(OWED_SWEEP_RETRY)
        } else {
            Action::await_change()
        }
    };
    match plan.next {
        Next::Ended(phase) => {
            report.ended(phase);
            Ok(done())
        }
        Next::Fail(outcome) => {
            report.failed_before_start(&outcome).await?;
            Ok(done())
        }
        Next::Run(run) => {
            if !targets.problems.is_empty() {
                tracing::info!(name = %resource.name(), "targets gone during the capture: {:?}", targets.problems);
            }
            let retargeted = act.retarget(&run.retargets).await;
            if let Some(nodes) = &run.starting {
                report.starting(nodes).await?;
            }
            act.record(&run.record);
            act.adopt(&run.adopts);
            act.start(&run.starts).await;
            let (phase, deferred) = report.progress(&ctx.tracker.nodes(uid, generation)).await?;
            Ok(if phase.is_final() {
                done()
            } else {
                let mut requeue = deferred.map_or(run.requeue, |d| d.min(run.requeue));
                if owing() {
                    requeue = requeue.min(OWED_SWEEP_RETRY);
                }
                if !retargeted {
                    requeue = requeue.min(RETARGET_RETRY);
                }
                Action::requeue(requeue)
            })
        }
    }
}

/// Removes a stop annotation that predates the generation (see
/// [`Resource::stale_stop`]), only while it has the value the plan saw: a
/// stop asked for since stays (the patch fails, and the reconcile is
/// retried).
async fn drop_stale_stop(ctx: &Context, resource: Resource<'_>, value: &str) -> Result<()> {
    // JSON pointer escapes: `~` as `~0`, `/` as `~1`.
    let key = STOP_REQUESTED.replace('~', "~0").replace('/', "~1");
    let path = format!("/metadata/annotations/{key}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": path, "value": value},
        {"op": "remove", "path": path},
    ]))
    .map_err(|source| Error::Json {
        what: "the stop annotation's removal",
        source,
    })?;
    tracing::info!(
        name = %resource.name(),
        generation = resource.generation,
        "removing {STOP_REQUESTED}={value}: it was set before the spec changed"
    );
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let api: Api<PacketCaptureConfig> = Api::all(ctx.client.clone());
    api.patch(&resource.name(), &params, &Patch::Json::<()>(patch))
        .await?;
    Ok(())
}

/// On delete: stop the capture on every node that ran it, then let the
/// finalizer go (an agent that does not answer gets an Event, and does not
/// hold the deletion). A status that counts nodes neither it nor the
/// tracker names (beyond `MAX_STATUS_NODES`, after a controller restart)
/// has every agent swept.
async fn cleanup(resource: Resource<'_>, ctx: &Context) -> Result<Action> {
    // Nodes that owe a stop from an earlier generation too.
    let owed = ctx.tracker.owed_sweeps(resource.uid);
    let mut nodes = owed.clone();
    // Nodes whose capture has ended: with no agent left there, nothing of
    // it runs to stop.
    let mut ended = BTreeSet::new();
    for p in ctx.tracker.forget(resource.uid) {
        if p.state.is_final() {
            ended.insert(p.node.clone());
        }
        nodes.insert(p.node);
    }
    let endpoints = ctx.agents.endpoints();
    if let Some(prev) = resource.previous() {
        if plan::unnamed_nodes(prev, nodes.iter().map(String::as_str)) {
            nodes.extend(endpoints.keys().cloned());
        }
        for e in prev.capture_files.values() {
            if e.status.is_final() {
                ended.insert(e.node.clone());
            }
            nodes.insert(e.node.clone());
        }
    }
    let clear: Vec<Clear> = nodes
        .into_iter()
        .map(|node| Clear {
            endpoint: endpoints.get(&node).cloned(),
            node,
        })
        .collect();
    let results = ctx.act(resource).clear(&clear).await;
    let stopped = results
        .iter()
        .filter(|(_, out)| matches!(out, Ok(n) if *n > 0))
        .count();
    let failures: Vec<(String, String)> = results
        .into_iter()
        .filter_map(|(node, out)| {
            let nothing_runs =
                ended.contains(&node) && !owed.contains(&node) && !endpoints.contains_key(&node);
            out.err().filter(|_| !nothing_runs).map(|why| (node, why))
        })
        .collect();
    ctx.report(resource).deleted(stopped, &failures).await;
    Ok(Action::await_change())
}

/// The captures a pod change concerns: all unfinished ones for an agent
/// pod, else those that select the pod (by name, labels or address) and
/// those that capture one of its addresses now (a pod that stopped
/// matching, or was deleted).
pub fn affected(
    store: &Store<PacketCaptureConfig>,
    ctx: &Context,
    pod: &Pod,
) -> Vec<ObjectRef<PacketCaptureConfig>> {
    let agent = ctx.agents.is_agent_pod(pod);
    let ips = targets::pod_ips(pod);
    store
        .state()
        .iter()
        .filter(|p| !is_done(p))
        .filter(|p| {
            agent
                || targets::spec_mentions_pod(&p.spec, pod, &ctx.caches)
                || p.uid()
                    .is_some_and(|uid| ctx.tracker.captures_any(&uid, &ips))
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// The captures a namespace change concerns: the unfinished ones that
/// select pods by namespace labels.
fn affected_by_namespace(
    store: &Store<PacketCaptureConfig>,
) -> Vec<ObjectRef<PacketCaptureConfig>> {
    store
        .state()
        .iter()
        .filter(|p| !is_done(p))
        .filter(|p| {
            p.spec
                .pod_selector
                .as_ref()
                .is_some_and(|s| s.namespace_selector.is_some())
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// Fails unless the CRD is installed.
pub async fn check_crd(client: &Client) -> Result<()> {
    let api: Api<PacketCaptureConfig> = Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err(Error::CrdMissing(packet_capture_common::crd::RESOURCE))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(settings: &Settings, client: Client, metrics: Arc<Metrics>) -> Result<()> {
    let port = settings.agent_port(&client).await?;
    let (pods, pod_writer) = reflector::store();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let (nodes, node_writer) = reflector::store();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(node_stream.for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!("watching nodes: {e}");
        }
    }));
    let (namespaces, namespace_writer) = reflector::store();
    let namespace_stream = reflector::reflector(
        namespace_writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();

    let tls = if settings.insecure_agent_plaintext {
        tracing::warn!(
            "INSECURE: --insecure-agent-plaintext is set: the agents are called over plain HTTP"
        );
        AgentTls::Plaintext
    } else {
        let trust = Arc::new(TrustedCas::default());
        let ca = match settings.agent_ca {
            AgentCa::SelfManaged => agent_certs::CaSource::SelfManaged {
                secret: settings.ca_secret.clone(),
            },
            AgentCa::Secret => agent_certs::CaSource::Kept {
                kept: settings.agent_ca_secret.clone(),
                own: settings.ca_secret.clone(),
            },
        };
        let signer = agent_certs::Settings {
            namespace: settings.namespace.clone(),
            service_account: settings.agent_service_account.clone(),
            ca,
            bundle_config_map: settings.agent_ca_config_map.clone(),
        };
        tokio::spawn(agent_certs::run(client.clone(), signer, trust.clone()));
        // No agent can be called before its certificate can be verified.
        trust.known().await;
        AgentTls::Verified(trust)
    };
    let settings_for_ctx = ContextSettings {
        pool: PoolSettings::new(settings, port, tls),
        namespace: settings.namespace.clone(),
        identity: settings.identity(),
        timing: Timing {
            agent_wait: settings.agent_wait(),
            ..Timing::default()
        },
    };
    let caches = Caches {
        pods,
        nodes,
        namespaces,
    };
    let (ctx, triggers) = Context::new(client.clone(), caches, settings_for_ctx, metrics);
    let for_pods = ctx.clone();
    tracing::info!(agent_port = port, namespace = %settings.namespace, "controller starting");
    let mut watched = watcher::Config::default();
    if let Some(selector) = &settings.capture_selector {
        tracing::info!(%selector, "only PacketCaptureConfigs with these labels");
        watched = watched.labels(&selector.to_string());
    }
    let controller = Controller::new(Api::<PacketCaptureConfig>::all(client), watched);
    let store = controller.store();
    let namespace_store = store.clone();
    controller
        .watches_stream(pod_stream, move |pod| affected(&store, &for_pods, &pod))
        .watches_stream(namespace_stream, move |_| {
            affected_by_namespace(&namespace_store)
        })
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!("reconcile: {e}"),
            }
        })
        .await;
    Ok(())
}
