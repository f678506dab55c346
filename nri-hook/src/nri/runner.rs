//! The runner: connects to the runtime, registers, gets configured and synchronized, serves
//! events, and reconnects with backoff when the runtime goes away.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use ttrpc::r#async::transport::{Listener, Socket};

use super::api::{self, nri_ttrpc};
use super::mux::{Mux, MuxEnd, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use super::plugin::{Configured, Plugin, Service};

/// Default NRI socket of containerd and CRI-O.
pub const DEFAULT_SOCKET: &str = "/var/run/nri/nri.sock";
/// Environment variable holding the fd of a pre-connected socket (pre-launched plugins).
pub const ENV_PLUGIN_SOCKET: &str = "NRI_PLUGIN_SOCKET";
/// Environment variable with the plugin name given by the runtime (pre-launched plugins).
pub const ENV_PLUGIN_NAME: &str = "NRI_PLUGIN_NAME";
/// Environment variable with the plugin index given by the runtime (pre-launched plugins).
pub const ENV_PLUGIN_IDX: &str = "NRI_PLUGIN_IDX";

/// Errors of the runner.
#[derive(Debug, thiserror::Error)]
pub enum NriError {
    /// Connecting to the runtime's socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `NRI_PLUGIN_SOCKET` is not a number.
    #[error("invalid {ENV_PLUGIN_SOCKET}={value:?}: not a file descriptor number")]
    PrelaunchedSocketNotANumber {
        /// The variable's value.
        value: String,
        /// The cause.
        #[source]
        source: std::num::ParseIntError,
    },
    /// `NRI_PLUGIN_SOCKET` names a descriptor that is not open.
    #[error("invalid {ENV_PLUGIN_SOCKET}={fd}: the descriptor is not open")]
    PrelaunchedSocketNotOpen {
        /// The descriptor.
        fd: i32,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The runtime refused or did not answer RegisterPlugin.
    #[error("registering plugin")]
    Register(#[source] ttrpc::Error),
    /// The runtime did not configure the plugin in time after registration.
    #[error("runtime did not configure the plugin within {0:?}")]
    ConfigureTimeout(Duration),
    /// Starting the ttrpc server failed.
    #[error("starting the ttrpc server")]
    Server(#[source] ttrpc::Error),
    /// The connection ended before the plugin was configured.
    #[error("connection ended before configuration: {0:?}")]
    EndedEarly(MuxEnd),
}

/// Where the runner gets its connection.
#[derive(Debug)]
pub enum Endpoint {
    /// Dial this socket (and again after each disconnect).
    Socket(PathBuf),
    /// A socket the runtime passed to a plugin it launched itself; used once.
    PreConnected(OwnedFd),
}

/// Runner settings.
#[derive(Debug)]
pub struct RunnerConfig {
    /// Plugin name (registration).
    pub name: String,
    /// Plugin index, two digits (registration; plugins are called in index order).
    pub idx: String,
    /// Where to connect.
    pub endpoint: Endpoint,
    /// First reconnect delay; doubled after each failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long to wait for RegisterPlugin's answer and then for Configure.
    pub registration_timeout: Duration,
}

impl RunnerConfig {
    /// Settings for a plugin dialing `socket`.
    pub fn new(
        name: impl Into<String>,
        idx: impl Into<String>,
        socket: impl Into<PathBuf>,
    ) -> Self {
        RunnerConfig {
            name: name.into(),
            idx: idx.into(),
            endpoint: Endpoint::Socket(socket.into()),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            registration_timeout: Duration::from_secs(5),
        }
    }

    /// Applies the pre-launched plugin environment (`NRI_PLUGIN_SOCKET`,
    /// `NRI_PLUGIN_NAME`, `NRI_PLUGIN_IDX`) when the runtime started this process.
    ///
    /// Takes ownership of the fd in `NRI_PLUGIN_SOCKET`; call it once.
    pub fn with_env(mut self) -> Result<Self, NriError> {
        if let Ok(name) = std::env::var(ENV_PLUGIN_NAME) {
            if !name.is_empty() {
                self.name = name;
            }
        }
        if let Ok(idx) = std::env::var(ENV_PLUGIN_IDX) {
            if !idx.is_empty() {
                self.idx = idx;
            }
        }
        if let Ok(fd) = std::env::var(ENV_PLUGIN_SOCKET) {
            if !fd.is_empty() {
                let n: i32 =
                    fd.parse()
                        .map_err(|source| NriError::PrelaunchedSocketNotANumber {
                            value: fd.clone(),
                            source,
                        })?;
                // F_GETFD only asks whether the descriptor is open.
                let open = if n < 0 {
                    Err(nix::Error::EBADF)
                } else {
                    nix::fcntl::fcntl(n, nix::fcntl::FcntlArg::F_GETFD)
                };
                if let Err(source) = open {
                    return Err(NriError::PrelaunchedSocketNotOpen { fd: n, source });
                }
                // SAFETY: the runtime handed this fd to us and nothing else in the process
                // owns it; we take it exactly once (the variable is removed).
                self.endpoint = Endpoint::PreConnected(unsafe { OwnedFd::from_raw_fd(n) });
                std::env::remove_var(ENV_PLUGIN_SOCKET);
            }
        }
        Ok(self)
    }
}

/// Drives a [`Plugin`] against a runtime.
///
/// ```no_run
/// use rthooks_nri_hook::nri::{api, EventMask, Plugin, PluginResult, Runner, RunnerConfig};
///
/// struct AddAnnotation;
///
/// #[async_trait::async_trait]
/// impl Plugin for AddAnnotation {
///     fn events(&self) -> EventMask {
///         EventMask::of(&[api::Event::CREATE_CONTAINER])
///     }
///
///     async fn create_container(
///         &self,
///         _pod: &api::PodSandbox,
///         _ctr: &api::Container,
///     ) -> PluginResult<api::CreateContainerResponse> {
///         let mut adjust = api::ContainerAdjustment::new();
///         adjust.annotations.insert("example.com/seen".into(), "yes".into());
///         let mut rsp = api::CreateContainerResponse::new();
///         rsp.adjust = protobuf::MessageField::some(adjust);
///         Ok(rsp)
///     }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = RunnerConfig::new("example", "50", "/var/run/nri/nri.sock").with_env()?;
/// // Runs until ctrl-c; reconnects whenever the runtime restarts.
/// Runner::new(AddAnnotation, config)
///     .run_until(async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Runner<P: Plugin> {
    plugin: Arc<P>,
    config: RunnerConfig,
}

impl<P: Plugin> Runner<P> {
    /// A runner for `plugin`.
    pub fn new(plugin: P, config: RunnerConfig) -> Self {
        Runner {
            plugin: Arc::new(plugin),
            config,
        }
    }

    /// The plugin.
    pub fn plugin(&self) -> &Arc<P> {
        &self.plugin
    }

    /// Serves until `shutdown` resolves. With a socket endpoint, failures and disconnects
    /// lead to a reconnect after a backoff (reset once a session got configured); with a
    /// pre-connected socket, returns when that one connection ends (the runtime relaunches
    /// the plugin).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), NriError> {
        tokio::pin!(shutdown);
        let mut delay = self.config.backoff_initial;
        loop {
            let endpoint =
                std::mem::replace(&mut self.config.endpoint, Endpoint::Socket(PathBuf::new()));
            let (stream, again) = match endpoint {
                Endpoint::PreConnected(fd) => {
                    let std = std::os::unix::net::UnixStream::from(fd);
                    std.set_nonblocking(true).map_err(|e| NriError::Connect {
                        path: PathBuf::from(format!("fd:{ENV_PLUGIN_SOCKET}")),
                        source: e,
                    })?;
                    let s = UnixStream::from_std(std).map_err(|e| NriError::Connect {
                        path: PathBuf::from(format!("fd:{ENV_PLUGIN_SOCKET}")),
                        source: e,
                    })?;
                    (Ok(s), None)
                }
                Endpoint::Socket(path) => {
                    let r = UnixStream::connect(&path)
                        .await
                        .map_err(|e| NriError::Connect {
                            path: path.clone(),
                            source: e,
                        });
                    self.config.endpoint = Endpoint::Socket(path.clone());
                    (r, Some(path))
                }
            };
            let outcome = match stream {
                Ok(stream) => {
                    tokio::select! {
                        r = self.session(stream) => r,
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(e) => Err(e),
            };
            match (&outcome, again.is_some()) {
                (Ok(end), true) => {
                    tracing::warn!(?end, "NRI connection ended; reconnecting");
                    delay = self.config.backoff_initial;
                }
                (Ok(end), false) => {
                    tracing::info!(?end, "pre-connected NRI socket closed; exiting");
                    return Ok(());
                }
                (Err(e), true) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "NRI session failed");
                }
                (Err(_), false) => return outcome.map(|_| ()),
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return Ok(()),
            }
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// One connection: register, wait for Configure, then serve until it ends. Returns how
    /// the connection ended once the plugin had been configured.
    pub async fn session(&self, stream: UnixStream) -> Result<MuxEnd, NriError> {
        let mut mux = Mux::new(stream, &[PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN]);
        let plugin_conn = mux.take(PLUGIN_SERVICE_CONN).expect("opened above");
        let runtime_conn = mux.take(RUNTIME_SERVICE_CONN).expect("opened above");

        let (service, mut configured) = Service::new(self.plugin.clone());
        let service: Arc<dyn nri_ttrpc::Plugin + Send + Sync> = Arc::new(service);
        let listener = Listener::new(futures::stream::iter([Ok::<_, std::io::Error>(
            plugin_conn,
        )]));
        let mut server = ttrpc::r#async::Server::new()
            .register_service(nri_ttrpc::create_plugin(service))
            .add_listener(listener);
        server.start().await.map_err(NriError::Server)?;

        let client =
            nri_ttrpc::RuntimeClient::new(ttrpc::r#async::Client::new(Socket::new(runtime_conn)));
        let timeout = self.config.registration_timeout;
        let mut req = api::RegisterPluginRequest::new();
        req.plugin_name = self.config.name.clone();
        req.plugin_idx = self.config.idx.clone();
        tracing::info!(name = %req.plugin_name, idx = %req.plugin_idx, "registering with the runtime");
        let reg = client.register_plugin(
            ttrpc::context::with_timeout(timeout.as_nanos() as i64),
            &req,
        );
        tokio::select! {
            r = reg => { r.map_err(NriError::Register)?; }
            end = mux.closed() => return Err(NriError::EndedEarly(end)),
        }

        let wait_configured = async {
            loop {
                if let Some(c) = configured.borrow_and_update().clone() {
                    return Some(c);
                }
                if configured.changed().await.is_err() {
                    return None;
                }
            }
        };
        let cfg: Configured = tokio::select! {
            c = tokio::time::timeout(timeout, wait_configured) => match c {
                Ok(Some(c)) => c,
                _ => return Err(NriError::ConfigureTimeout(timeout)),
            },
            end = mux.closed() => return Err(NriError::EndedEarly(end)),
        };
        tracing::info!(
            runtime = %cfg.runtime_name,
            version = %cfg.runtime_version,
            events = cfg.events.0,
            "registered"
        );
        let end = mux.closed().await;
        // The client and server tasks see the connections fail and wind down by themselves.
        drop(client);
        drop(server);
        Ok(end)
    }
}
