//! Start-up and shutdown, the same for every service: connect the database
//! and the broker, bind the HTTP port, run the server, the consumer loop and
//! the outbox relay, and stop them in order on SIGTERM.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use futures::future::BoxFuture;

use sqlx::migrate::Migrator;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Verifier;
use crate::config::{ConfigError, ServiceConfig};
use crate::consumer::{self, ConsumerOptions, EventLoop, Handler};
use crate::health::Health;
use crate::http::{self, Probes};
use crate::kafka::{self, EventProducer};
use crate::outbox::{Outbox, Relay};
use crate::telemetry;

/// The connections a service is built from.
#[derive(Clone)]
pub struct Infra {
    pub config: ServiceConfig,
    /// For request handlers and probes.
    pub pool: PgPool,
    /// For the consumer loop and the outbox relay only (see
    /// [`crate::db::background_pool`]).
    pub background: PgPool,
    pub producer: EventProducer,
    pub outbox: Outbox,
    /// What background work reports to `/ready`.
    pub health: Health,
    /// Checks bearer tokens; `None` when authentication is off.
    pub auth: Option<Verifier>,
}

impl Infra {
    /// Creates and migrates the database, the producer, and every saga topic
    /// (with its dead-letter topic) that is missing.
    ///
    /// The key set of authentication is read first, so that a wrong
    /// `AUTH_*` setting stops start-up at once.
    pub async fn connect(config: ServiceConfig, migrations: Migrator) -> anyhow::Result<Self> {
        let health = Health::default();
        let auth = match &config.auth {
            Some(auth) => {
                Some(Verifier::load(config.service_name, auth.clone(), health.clone()).await?)
            }
            None => {
                tracing::warn!(
                    "authentication is off: every API route is open to anyone who can reach \
                     this port (set AUTH_JWKS_URL or AUTH_JWKS_FILE, AUTH_ISSUER and \
                     AUTH_AUDIENCE to require bearer tokens)"
                );
                None
            }
        };
        let pool = crate::db::connect_and_migrate(
            &config.database_url,
            config.max_connections,
            migrations,
        )
        .await?;
        let mut topics = Vec::new();
        for t in events::topics::ALL {
            let name = config.kafka.topic(t);
            topics.push(events::topics::dlq(&name));
            topics.push(name);
        }
        kafka::ensure_topics(&config.kafka, &topics).await?;
        let producer = kafka::producer(&config.kafka, config.service_name)?;
        let outbox = Outbox::new(&config.kafka);
        let background = crate::db::background_pool(&pool);
        Ok(Self {
            config,
            pool,
            background,
            producer,
            outbox,
            health,
            auth,
        })
    }
}

/// The share of the shutdown grace period kept for flushing spans.
const TELEMETRY_FLUSH: Duration = Duration::from_secs(1);

type Worker = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// A built service, bound to its port, not yet running.
pub struct App {
    infra: Infra,
    listener: TcpListener,
    router: Router,
    consumer: Option<Worker>,
    /// The service's own background work (see [`App::with_task`]).
    tasks: Vec<Worker>,
}

impl App {
    /// Binds `HOST:PORT` (port 0 picks a free one) and wires the service's
    /// documented `routes` behind authentication (see [`crate::auth`]),
    /// with the probes, the API description (`/openapi.json`, `/docs`),
    /// body limit and JSON fallbacks. `about` describes the service in the
    /// document ([`crate::api_info!`]). With `subscription`, the service consumes those
    /// (unprefixed) topics with `handler`.
    pub async fn new<H: Handler>(
        infra: Infra,
        routes: OpenApiRouter,
        about: crate::api::ApiInfo,
        subscription: Option<(&[&str], H)>,
    ) -> anyhow::Result<Self> {
        let cfg = &infra.config;
        let verifier = infra.auth.clone();
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr} (PORT={})", cfg.port))?;
        let (service_routes, mut api) = routes.split_for_parts();
        let service_routes = service_routes.route_layer(axum::middleware::from_fn_with_state(
            verifier.clone(),
            crate::auth::authenticate,
        ));
        let (probe_routes, probe_api) = http::probe_routes(Probes {
            pool: infra.pool.clone(),
            producer: infra.producer.clone(),
            health: infra.health.clone(),
        })
        .split_for_parts();
        api.merge(probe_api);
        crate::api::finish(&mut api, cfg.service_name, about, verifier.is_some());
        let router = service_routes
            .merge(probe_routes)
            .merge(crate::api::routes(api))
            .fallback(http::not_found)
            .method_not_allowed_fallback(http::method_not_allowed)
            .layer(axum::middleware::from_fn(http::trace_request))
            .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY_BYTES));
        let mut tasks: Vec<Worker> = Vec::new();
        let consumer = match subscription {
            None => None,
            Some((topics, handler)) => {
                // Parked events this build now handles go out again.
                let known = crate::parked::Known::new(
                    |kind| handler.accepts(kind),
                    cfg.unknown_event_types.clone(),
                );
                let (pool, producer, service) =
                    (infra.pool.clone(), infra.producer.clone(), cfg.service_name);
                tasks.push(Box::new(move |token| {
                    Box::pin(crate::parked::run(pool, producer, known, service, token))
                }));
                let subscription = consumer::Subscription {
                    kafka: cfg.kafka.clone(),
                    service: cfg.service_name,
                    instance_id: cfg.group_instance_id.clone(),
                    protocol: cfg.group_protocol.clone(),
                    topics: topics.iter().map(|t| cfg.kafka.topic(t)).collect(),
                };
                let event_loop = EventLoop {
                    service: cfg.service_name,
                    consumer: Arc::new(subscription.connect()?),
                    subscription,
                    pool: infra.background.clone(),
                    outbox: infra.outbox.clone(),
                    producer: infra.producer.clone(),
                    handler: Arc::new(handler),
                    options: ConsumerOptions {
                        unknown_event_types: cfg.unknown_event_types.clone(),
                        ..ConsumerOptions::default()
                    },
                    health: infra.health.clone(),
                };
                let worker: Worker = Box::new(move |token| Box::pin(event_loop.run(token)));
                Some(worker)
            }
        };
        if let Some(v) = verifier {
            tasks.push(Box::new(move |token| Box::pin(v.refresh(token))));
        }
        Ok(Self {
            infra,
            listener,
            router,
            consumer,
            tasks,
        })
    }

    /// Runs `task` beside the server and the consumer. It gets the shutdown
    /// token and must return once it is cancelled; it is awaited before the
    /// relay stops, so the events it committed still go out. A task that
    /// returns before shutdown stops the service (exit 1).
    pub fn with_task<F, Fut>(mut self, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .push(Box::new(move |token| Box::pin(task(token))));
        self
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener
            .local_addr()
            .context("reading the bound address")
    }

    /// The producer of the outbox relay and the dead-letter path.
    pub fn producer(&self) -> &EventProducer {
        &self.infra.producer
    }

    pub fn port(&self) -> u16 {
        self.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Runs until `shutdown` is cancelled, then stops in order: the HTTP
    /// server stops accepting and finishes in-flight requests, the consumer
    /// finishes its batch and commits offsets, the relay publishes what is
    /// committed and flushes the producer.
    ///
    /// Dropping the returned future (e.g. aborting its task) stops everything
    /// at once, as a crash would: nothing more is committed.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            infra,
            listener,
            router,
            consumer,
            tasks,
        } = self;
        let service = infra.config.service_name;
        let grace = infra.config.shutdown_grace;
        let mut workers = JoinSet::new();
        let relay_token = CancellationToken::new();
        let relay = Relay::new(
            infra.background.clone(),
            infra.producer.clone(),
            infra.outbox.clone(),
            service,
        );
        workers.spawn(relay.run(relay_token.clone()));
        workers.spawn(crate::retention::run(
            infra.pool.clone(),
            service,
            relay_token.clone(),
        ));
        let mut consumer_task = JoinSet::new();
        for task in consumer.into_iter().chain(tasks) {
            consumer_task.spawn(task(shutdown.clone()));
        }
        tracing::info!(service, addr = %listener.local_addr().context("reading the bound address")?, "service started");

        let http_token = shutdown.clone();
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_token.cancelled().await })
            .into_future();
        tokio::pin!(server);
        let mut server_done = false;
        let failure: Option<anyhow::Error> = tokio::select! {
            r = &mut server => {
                server_done = true;
                r.err().map(|e| anyhow::Error::new(e).context("HTTP server failed"))
            }
            Some(_) = consumer_task.join_next() => (!shutdown.is_cancelled()).then(|| anyhow::anyhow!("consumer loop or a service task stopped unexpectedly")),
            Some(_) = workers.join_next() => Some(anyhow::anyhow!("outbox relay or retention task stopped unexpectedly")),
            fatal = producer_fatal(&infra.producer) => Some(anyhow::anyhow!("fatal Kafka producer error: {fatal}")),
            _ = shutdown.cancelled() => None,
        };
        // Everything below must end within the grace period, whatever the
        // database and the broker do meanwhile (a supervisor's stop sends
        // SIGKILL after its own grace period).
        let deadline = tokio::time::Instant::now() + grace.saturating_sub(TELEMETRY_FLUSH);
        shutdown.cancel();
        tracing::info!(service, "shutting down");
        let drain = async {
            if !server_done {
                let _ = (&mut server).await;
            }
            while consumer_task.join_next().await.is_some() {}
            relay_token.cancel();
            while workers.join_next().await.is_some() {}
        };
        // The last quarter of the grace period is kept for closing the pools.
        let drain_until = deadline - grace / 4;
        if tokio::time::timeout_at(drain_until, drain).await.is_err() {
            tracing::warn!(service, "shutdown grace period elapsing; abandoning unfinished work (it is redone after restart)");
            relay_token.cancel();
            consumer_task.abort_all();
            workers.abort_all();
        }
        // Closing waits for every connection to come back; one stuck in a
        // statement (a lock wait, a database that stopped answering) would
        // hold it up for good, so the wait is bounded too.
        let close = async {
            infra.pool.close().await;
            infra.background.close().await;
        };
        if tokio::time::timeout_at(deadline, close).await.is_err() {
            tracing::warn!(
                service,
                "database connections still busy at the end of the grace period; leaving them"
            );
        }
        tracing::info!(service, "stopped");
        failure.map_or(Ok(()), Err)
    }
}

/// Resolves with the producer's fatal error once librdkafka raises one
/// (e.g. a fenced idempotent producer): the producer can never deliver
/// again, so the service must stop and be restarted.
async fn producer_fatal(producer: &EventProducer) -> String {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Some(fatal) = kafka::fatal_error(producer.client()) {
            return fatal;
        }
    }
}

/// The whole `main` of a service: read the configuration, set up telemetry,
/// build with `build`, run until SIGTERM or Ctrl-C, then exit the process:
/// 0 after a requested stop (always within `SHUTDOWN_GRACE_SECS`), 1 when
/// the service stopped on its own (a fatal Kafka error, a task that died).
/// Configuration errors are one line on stderr and exit code 2; other
/// start-up failures exit 1.
pub async fn run_service<F, Fut>(service: &'static str, default_port: u16, build: F) -> ExitCode
where
    F: FnOnce(ServiceConfig) -> Fut,
    Fut: Future<Output = anyhow::Result<App>>,
{
    let config = match ServiceConfig::from_env(service, default_port) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{service}: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry_guard = match telemetry::init(service) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{service}: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let app = match build(config).await {
        Ok(app) => app,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                eprintln!("{service}: configuration error: {c}");
                return ExitCode::from(2);
            }
            eprintln!("{service}: failed to start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        on_signal.cancel();
    });
    let code = match app.run(shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{service}: {e:#}");
            1
        }
    };
    // Exit here rather than by returning: returning would drop the runtime,
    // which waits for blocking work that a broker or database that stopped
    // answering can hold up well past the grace period (librdkafka's
    // consumer close, a synchronous commit). Spans still go out, within a
    // bound of their own.
    let flush = tokio::task::spawn_blocking(move || drop(telemetry_guard));
    if tokio::time::timeout(TELEMETRY_FLUSH, flush).await.is_err() {
        eprintln!("{service}: flushing telemetry timed out");
    }
    std::process::exit(code)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
