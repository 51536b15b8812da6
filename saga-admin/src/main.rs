//! `saga-admin`: operator commands for the checkout saga.
//!
//! ```text
//! saga-admin audit --order-url http://localhost:3000 --payment-url http://localhost:3001 \
//!     --inventory-url http://localhost:3002 [--pending-older-than 120s] [--json]
//! saga-admin dlq list [--topic T] [--consumer C] [--reason TEXT] [--order ID] [--since TIME] [--json]
//! saga-admin dlq show <dlq-topic> <offset> [--partition P]
//! saga-admin dlq redrive [filters | --message <dlq-topic>/<partition>@<offset>] [--dry-run] [--force]
//! saga-admin dev-token --sub c-42 [--admin] [--ttl 1h]     # development only
//! saga-admin dev-jwks                                     # development only
//! ```
//!
//! With authentication on, the commands that call the services' APIs
//! (`audit`) send `--token` / `SAGA_TOKEN` as a bearer token: an
//! operator's token (scope `saga:admin`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use saga_admin::audit::{self, Options, Violation};
use saga_admin::dlq::{self, DeadLetters, Filter, Position};

#[derive(Debug, Parser)]
#[command(name = "saga-admin", about = "Operator commands for the checkout saga")]
struct Cli {
    /// Bearer token for the services' APIs (an operator's: scope
    /// saga:admin), when they run with authentication on.
    #[arg(long, env = "SAGA_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks that every order's end state agrees across the three services
    /// and that every SKU's books balance. Exit status: 0 clean, 1
    /// violations found, 2 could not run.
    Audit {
        #[arg(long, env = "ORDER_URL", default_value = "http://localhost:3000")]
        order_url: String,
        #[arg(long, env = "PAYMENT_URL", default_value = "http://localhost:3001")]
        payment_url: String,
        #[arg(long, env = "INVENTORY_URL", default_value = "http://localhost:3002")]
        inventory_url: String,
        /// A PENDING order older than this is a violation (stuck).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
        pending_older_than: Duration,
        /// Orders that changed more recently than this may still have
        /// compensations in flight (a refund after out-of-stock): their
        /// cross-service checks are skipped and they are counted as in flight.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        settle: Duration,
        /// Rows fetched per page from each service (1 to 500).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=500))]
        page_size: u16,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list them, show one, redrive them to their original
    /// topic. The broker comes from --brokers or KAFKA_BROKERS, topic
    /// names take KAFKA_TOPIC_PREFIX like the services.
    Dlq {
        /// Bootstrap servers.
        #[arg(
            long,
            env = "KAFKA_BROKERS",
            default_value = "localhost:9092",
            global = true
        )]
        brokers: String,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// DEVELOPMENT ONLY: prints a JWT signed with the development key
    /// (dev/auth/dev-es256.pem, public in the repository: never trust it
    /// in a deployment), for services started with
    /// AUTH_JWKS_FILE=dev/auth/jwks.json.
    DevToken {
        /// The customer (the token's `sub`).
        #[arg(long)]
        sub: String,
        /// Adds scope saga:admin (an operator).
        #[arg(long)]
        admin: bool,
        /// Lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: Duration,
        #[arg(long, default_value = "dev/auth/dev-es256.pem")]
        key: String,
        #[arg(long, default_value = saga_admin::token::DEV_KID)]
        kid: String,
        #[arg(long, default_value = saga_admin::token::DEV_ISSUER)]
        issuer: String,
        #[arg(long, default_value = saga_admin::token::DEV_AUDIENCE)]
        audience: String,
    },
    /// DEVELOPMENT ONLY: prints the JWK set of the development key (what
    /// dev/auth/jwks.json holds).
    DevJwks {
        #[arg(long, default_value = "dev/auth/dev-es256.pem")]
        key: String,
        #[arg(long, default_value = saga_admin::token::DEV_KID)]
        kid: String,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter: where it is, where it came from, the
    /// consumer, when and why it failed, its order and event type.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// The headers, key and value of a dead letter.
    Show {
        /// The dead-letter topic (`order-events.dlq`, or `order-events`).
        topic: String,
        offset: i64,
        /// Only this partition (else every partition holding that offset).
        #[arg(long)]
        partition: Option<i32>,
    },
    /// Produces dead letters again to the topic they came from, with their
    /// key, value and headers, plus dlq.redriven_from and dlq.redriven_at.
    /// Exit status: 0 all redriven, 1 some skipped or failed, 2 could not run.
    Redrive {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this dead letter: `<dlq-topic>/<partition>@<offset>`.
        #[arg(long, conflicts_with_all = ["topic", "consumer", "reason", "order", "since"])]
        message: Option<String>,
        /// Say what would be redriven; produce nothing, record nothing.
        #[arg(long)]
        dry_run: bool,
        /// Redrive dead letters that were redriven before, too.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
struct FilterArgs {
    /// The original topic (`order-events`, `payment-events`, `inventory-events`).
    #[arg(long)]
    topic: Option<String>,
    /// The service that dead-lettered it (`payment-service`, …).
    #[arg(long)]
    consumer: Option<String>,
    /// A piece of the reason (case-insensitive).
    #[arg(long)]
    reason: Option<String>,
    /// The order ID.
    #[arg(long)]
    order: Option<String>,
    /// Failed at or after: an RFC 3339 time, or a duration back from now (`2h`).
    #[arg(long, value_parser = dlq::parse_since)]
    since: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<FilterArgs> for Filter {
    fn from(a: FilterArgs) -> Self {
        Filter {
            topic: a.topic,
            consumer: a.consumer,
            reason: a.reason,
            order: a.order,
            since: a.since,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DevToken {
            sub,
            admin,
            ttl,
            key,
            kid,
            issuer,
            audience,
        } => dev_token(
            &key,
            &saga_admin::token::DevClaims {
                subject: sub,
                admin,
                ttl,
                issuer,
                audience,
                kid,
            },
        ),
        Command::DevJwks { key, kid } => dev_jwks(&key, &kid),
        Command::Dlq { brokers, command } => match run_dlq(brokers, command).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("saga-admin dlq: could not run: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Audit {
            order_url,
            payment_url,
            inventory_url,
            pending_older_than,
            settle,
            page_size,
            json,
        } => {
            let options = Options {
                order_url,
                payment_url,
                inventory_url,
                pending_older_than,
                settle,
                page_size,
                token: cli.token,
            };
            run_audit(&options, json).await
        }
    }
}

/// Prints a development token: exit 0, or 2 with the reason.
fn dev_token(key: &str, claims: &saga_admin::token::DevClaims) -> ExitCode {
    match saga_admin::token::mint(key, claims) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("saga-admin dev-token: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints the development key set: exit 0, or 2 with the reason.
fn dev_jwks(key: &str, kid: &str) -> ExitCode {
    match saga_admin::token::jwks(key, kid)
        .map_err(|e| e.to_string())
        .and_then(|set| serde_json::to_string_pretty(&set).map_err(|e| e.to_string()))
    {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("saga-admin dev-jwks: {e}");
            ExitCode::from(2)
        }
    }
}

/// Audits the books: each violation as it is found (or all of them in one
/// JSON document), then the totals. Exit 0 when the books balance, 1 with
/// violations, 2 when the audit could not run.
async fn run_audit(options: &Options, json: bool) -> ExitCode {
    let mut found: Vec<Violation> = Vec::new();
    let outcome = audit::run(options, |v| {
        if json {
            found.push(v.clone());
        } else {
            println!("VIOLATION {v}");
        }
    })
    .await;
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("saga-admin audit: could not run: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "orders_audited": report.orders,
                "orders_in_flight": report.in_flight,
                "skus_audited": report.skus,
                "violations": found,
            })
        );
    } else {
        if report.in_flight > 0 {
            println!(
                "{} orders changed in the last {} and were not judged",
                report.in_flight,
                humantime::format_duration(options.settle)
            );
        }
        println!(
            "{} orders audited, {} violations",
            report.orders, report.violations
        );
    }
    if report.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run_dlq(brokers: String, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let mut kafka = saga_runtime::KafkaConfig::from_env()?;
    kafka.brokers = brokers;
    let letters = DeadLetters::new(kafka);
    match command {
        DlqCommand::List { filter, json } => {
            // Printed as read, a page at a time: a JSON array, or lines.
            let mut printed = 0usize;
            let mut failed: Option<serde_json::Error> = None;
            if json {
                print!("[");
            }
            letters
                .list_each(&filter.into(), |d| {
                    if !json {
                        println!("{}", d.line());
                        printed += 1;
                        return;
                    }
                    match serde_json::to_string_pretty(&d) {
                        Ok(text) => {
                            print!("{}\n{text}", if printed == 0 { "" } else { "," });
                            printed += 1;
                        }
                        Err(e) => failed = Some(e),
                    }
                })
                .await?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            if json {
                println!("{}]", if printed == 0 { "" } else { "\n" });
            } else {
                println!("{printed} dead letters");
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show {
            topic,
            offset,
            partition,
        } => {
            let found = letters.show(&topic, partition, offset).await?;
            if found.is_empty() {
                eprintln!(
                    "no dead letter at offset {offset} of {}",
                    letters.dlq_topic(&topic)
                );
                return Ok(ExitCode::from(1));
            }
            for d in &found {
                println!("{}", d.dump());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive {
            filter,
            message,
            dry_run,
            force,
        } => {
            let bar = indicatif::ProgressBar::no_length();
            let report = |r: &dlq::Redriven| {
                bar.suspend(|| match &r.to {
                    Some(to) => println!("{} -> {to}: {}", r.from, r.outcome),
                    None => println!("{}: {}", r.from, r.outcome),
                });
                bar.inc(1);
            };
            let done = match message {
                Some(m) => {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                    let at: Position = m.parse().map_err(anyhow::Error::msg)?;
                    let found = letters
                        .show(&at.topic, Some(at.partition), at.offset)
                        .await?;
                    if found.is_empty() {
                        eprintln!("no dead letter at {at}");
                        return Ok(ExitCode::from(1));
                    }
                    letters.redrive(&found, force, dry_run, report).await?
                }
                // Redriven as read, a page at a time.
                None => {
                    letters
                        .redrive_matching(&filter.into(), force, dry_run, report)
                        .await?
                }
            };
            bar.finish_and_clear();
            let redriven = done.iter().filter(|r| r.to.is_some()).count();
            let all = if dry_run {
                done.iter().all(|r| r.outcome.starts_with("would"))
            } else {
                redriven == done.len()
            };
            println!(
                "{} dead letters selected, {} {}",
                done.len(),
                if dry_run {
                    done.iter()
                        .filter(|r| r.outcome.starts_with("would"))
                        .count()
                } else {
                    redriven
                },
                if dry_run {
                    "would be redriven (dry run)"
                } else {
                    "redriven"
                }
            );
            Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
