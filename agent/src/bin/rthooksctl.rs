//! rthooksctl: talk to a running rthooks-agent over its UNIX socket.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rthooks_api::v1;
use rthooks_api::v1::agent_client::AgentClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "rthooksctl",
    version,
    about = "Inspect and steer a running rthooks-agent"
)]
struct Cli {
    /// Agent socket.
    #[arg(long, env = "RTHOOKS_GRPC_ADDRESS", default_value = rthooks_api::DEFAULT_AGENT_ADDRESS, global = true)]
    address: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Enforcement mode, kernel, map fill, counts.
    Status,
    /// Containers the agent knows, with the policies that select them.
    Containers,
    /// List, add, delete or dry-run policies.
    Policies {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Stream enforcement events (deny, kill, audit) as they happen.
    Events,
    /// Look at what the kernel side holds, without the agent.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// The pinned maps' contents, read from the kernel (needs root; works while the agent
    /// is down): containers (cgroup id → policy slots), binaries (path hash → policy slots
    /// per action), the cgroup levels setting.
    Maps {
        /// The agent's bpffs pin directory.
        #[arg(
            long,
            env = "RTHOOKS_BPF_PIN_DIR",
            default_value = "/sys/fs/bpf/rthooks"
        )]
        bpf_pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    List,
    /// Load a policy from a YAML file ("-" for stdin) through the API.
    Add {
        file: String,
    },
    /// Delete an API policy.
    Delete {
        name: String,
        #[arg(long, default_value = "")]
        namespace: String,
    },
    /// Dry run: which known containers the policies in FILE would select (nothing is loaded).
    Check {
        file: String,
    },
}

fn read_file(path: &str) -> Result<String> {
    if path == "-" {
        return std::io::read_to_string(std::io::stdin()).context("reading stdin");
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn container_json(c: &v1::Container) -> serde_json::Value {
    serde_json::json!({
        "container_id": c.container_id, "container_name": c.container_name, "image": c.image,
        "pod_name": c.pod_name, "pod_uid": c.pod_uid, "pod_namespace": c.pod_namespace,
        "pod_labels": c.pod_labels, "cgroup_id": c.cgroup_id, "cgroup_path": c.cgroup_path,
        "policies": c.policies, "covered": c.covered, "source": c.source,
    })
}

fn print_containers(out: Output, list: &[v1::Container]) {
    if out == Output::Json {
        let v: Vec<_> = list.iter().map(container_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return;
    }
    println!(
        "{:<14} {:<20} {:<30} {:>10} {:<8} POLICIES",
        "CONTAINER", "NAME", "POD", "CGROUP", "COVERED"
    );
    for c in list {
        let id: String = c.container_id.chars().take(13).collect();
        println!(
            "{:<14} {:<20} {:<30} {:>10} {:<8} {}",
            id,
            c.container_name,
            format!("{}/{}", c.pod_namespace, c.pod_name),
            c.cgroup_id,
            if c.covered { "yes" } else { "NO" },
            c.policies.join(",")
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("rthooksctl: {e:#}");
        std::process::exit(1);
    }
}

/// `rthooksctl debug maps`: the pinned maps as JSON or tables, keys in ascending order.
fn print_maps(out: Output, pin_dir: &Path) -> Result<()> {
    let (containers, binaries, cgroup_levels) = rthooks_agent::bpf::maps::read_pinned(pin_dir)
        .with_context(|| format!("reading the maps pinned in {}", pin_dir.display()))?;
    let mut containers: Vec<_> = containers.into_iter().collect();
    containers.sort_by_key(|(id, _)| *id);
    let mut binaries: Vec<_> = binaries.into_iter().collect();
    binaries.sort_by_key(|(hash, _)| *hash);
    let slots = |set: &rthooks_common::PolicySet| set.slots().collect::<Vec<_>>();
    if out == Output::Json {
        let containers: Vec<_> = containers
            .iter()
            .map(|(id, set)| serde_json::json!({"cgroup_id": id, "policy_slots": slots(set)}))
            .collect();
        let binaries: Vec<_> = binaries
            .iter()
            .map(|(hash, r)| {
                serde_json::json!({"path_hash": hash, "deny": slots(&r.deny), "kill": slots(&r.kill), "audit": slots(&r.audit)})
            })
            .collect();
        let v = serde_json::json!({
            "pin_dir": pin_dir, "containers": containers, "binaries": binaries,
            "cgroup_levels": cgroup_levels,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let list = |set: &rthooks_common::PolicySet| {
        slots(set)
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    println!("{:<20} POLICY SLOTS", "CGROUP ID");
    for (id, set) in &containers {
        println!("{id:<20} {}", list(set));
    }
    println!();
    println!("{:<20} {:<12} {:<12} AUDIT", "PATH HASH", "DENY", "KILL");
    for (hash, r) in &binaries {
        println!(
            "{hash:<20} {:<12} {:<12} {}",
            list(&r.deny),
            list(&r.kill),
            list(&r.audit)
        );
    }
    println!();
    println!("cgroup levels: {cgroup_levels:#x}");
    Ok(())
}

/// A client of the agent at `address`.
async fn connect(address: &str) -> Result<AgentClient<Channel>> {
    let channel: Channel = rthooks_api::client::connect_unix(address, Duration::from_secs(3))
        .await
        .with_context(|| format!("cannot reach the agent at {address}"))?;
    Ok(AgentClient::new(channel))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Status => {
            let s = connect(&cli.address)
                .await?
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            if cli.output == Output::Json {
                let maps: Vec<_> = s.maps.iter().map(|m| serde_json::json!({"name": m.name, "entries": m.entries, "capacity": m.capacity})).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "enforcement_mode": s.enforcement_mode, "enforcement_reason": s.enforcement_reason,
                        "kernel_release": s.kernel_release, "maps": maps, "containers": s.containers,
                        "policies": s.policies, "ring_buffer_drops": s.ring_buffer_drops, "version": s.version,
                    }))?
                );
            } else {
                println!(
                    "enforcement: {} ({})",
                    s.enforcement_mode, s.enforcement_reason
                );
                println!("kernel:      {}", s.kernel_release);
                println!(
                    "containers:  {}   policies: {}   ring-buffer drops: {}",
                    s.containers, s.policies, s.ring_buffer_drops
                );
                for m in s.maps {
                    println!("map {:<11} {}/{}", m.name, m.entries, m.capacity);
                }
            }
        }
        Command::Containers => {
            let list = connect(&cli.address)
                .await?
                .list_containers(v1::ListContainersRequest {})
                .await?
                .into_inner()
                .containers;
            print_containers(cli.output, &list);
        }
        Command::Policies { command } => {
            let mut client = connect(&cli.address).await?;
            match command {
                PolicyCommand::List => {
                    let list = client
                        .list_policies(v1::ListPoliciesRequest {})
                        .await?
                        .into_inner()
                        .policies;
                    if cli.output == Output::Json {
                        let v: Vec<_> = list.iter().map(|p| serde_json::json!({"name": p.name, "kind": p.kind, "namespace": p.namespace, "slot": p.slot, "source": p.source, "yaml": p.yaml})).collect();
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!(
                            "{:<30} {:<26} {:<12} {:>4} SOURCE",
                            "NAME", "KIND", "NAMESPACE", "SLOT"
                        );
                        for p in list {
                            println!(
                                "{:<30} {:<26} {:<12} {:>4} {}",
                                p.name, p.kind, p.namespace, p.slot, p.source
                            );
                        }
                    }
                }
                PolicyCommand::Add { file } => {
                    let p = client
                        .add_policy(v1::AddPolicyRequest {
                            yaml: read_file(&file)?,
                        })
                        .await?
                        .into_inner();
                    let p = p.policy.unwrap_or_default();
                    println!("policy {} loaded in slot {}", p.name, p.slot);
                }
                PolicyCommand::Delete { name, namespace } => {
                    client
                        .delete_policy(v1::DeletePolicyRequest {
                            name: name.clone(),
                            namespace,
                        })
                        .await?;
                    println!("policy {name} deleted");
                }
                PolicyCommand::Check { file } => {
                    let r = client
                        .check_policy(v1::CheckPolicyRequest {
                            yaml: read_file(&file)?,
                        })
                        .await?
                        .into_inner();
                    if cli.output == Output::Table {
                        println!("{} known container(s) would be selected:", r.selected.len());
                    }
                    print_containers(cli.output, &r.selected);
                }
            }
        }
        // The maps are read from the kernel: no agent to connect to.
        Command::Debug {
            command: DebugCommand::Maps { bpf_pin_dir },
        } => print_maps(cli.output, &bpf_pin_dir)?,
        Command::Events => {
            let mut stream = connect(&cli.address)
                .await?
                .get_events(v1::GetEventsRequest {})
                .await?
                .into_inner();
            while let Some(e) = stream.message().await? {
                let c = e.container.clone().unwrap_or_default();
                if cli.output == Output::Json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "time": e.time, "action": e.action, "pid": e.pid, "binary": e.binary, "comm": e.comm,
                            "cgroup_id": e.cgroup_id, "policies": e.policies, "enforcement_mode": e.enforcement_mode,
                            "container": container_json(&c),
                        })
                    );
                } else {
                    println!(
                        "{} {:<5} {} pid={} pod={}/{} container={} policies={}",
                        e.time,
                        e.action,
                        e.binary,
                        e.pid,
                        c.pod_namespace,
                        c.pod_name,
                        c.container_name,
                        e.policies.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}
