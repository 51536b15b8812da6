//! Writes the event contract: `events/asyncapi.json` (AsyncAPI 3.0) and
//! `docs/events.md` (the same as a table), from the `events` crate. With
//! `--snapshot`, also `events/schemas/v<SCHEMA_VERSION>.json`, the
//! schemas of a release that later changes must stay compatible with
//! (never overwritten: an existing snapshot is a released contract).
//!
//! ```sh
//! cargo run -p events --example asyncapi
//! ```

use std::path::Path;
use std::process::ExitCode;

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut result = write(
        &crate_dir.join("asyncapi.json"),
        &events::asyncapi::document_text(),
    )
    .and_then(|()| {
        write(
            &crate_dir.join("../docs/events.md"),
            &events::asyncapi::markdown(),
        )
    });
    if std::env::args().any(|a| a == "--snapshot") {
        let path = crate_dir.join(events::compat::snapshot_path(events::SCHEMA_VERSION));
        result = result.and_then(|()| {
            if path.exists() {
                println!(
                    "{} exists: a released contract is never rewritten",
                    path.display()
                );
                Ok(())
            } else {
                path.parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| write(&path, &events::compat::snapshot_text()))
            }
        });
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asyncapi: {e}");
            ExitCode::FAILURE
        }
    }
}
