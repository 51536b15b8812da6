//! `saga-admin`: operator commands for the checkout saga.
//!
//! ```text
//! saga-admin audit --order-url http://localhost:3000 --payment-url http://localhost:3001 \
//!     --inventory-url http://localhost:3002 [--pending-older-than 120s] [--json]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use saga_admin::audit::{self, Options, Violation};

#[derive(Debug, Parser)]
#[command(name = "saga-admin", about = "Operator commands for the checkout saga")]
struct Cli {
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
            };
            let mut found: Vec<Violation> = Vec::new();
            let outcome = audit::run(&options, |v| {
                if json {
                    found.push(v.clone());
                } else {
                    println!("VIOLATION {v}");
                }
            })
            .await;
            match outcome {
                Ok(report) => {
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
                Err(e) => {
                    eprintln!("saga-admin audit: could not run: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
