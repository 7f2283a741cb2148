//! `distlock release --force`: take a lock away from a stuck holder.

use std::process::ExitCode;

use distlock::ErrorKind;

use crate::status::{shown, EXIT_UNSUPPORTED};
use crate::StoreArgs;

#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The key whose holds to end.
    key: String,
    /// End the holds of other sessions: required, as this takes a lock away
    /// from whoever holds it.
    #[arg(long)]
    force: bool,
}

pub async fn release(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.force,
        "distlock release ends whoever holds '{}'; add --force to mean it (a lock taken by \
         distlock run ends when its command does)",
        args.key
    );
    let client = args.store.connect().await?;
    let released = match client.force_release(&args.key).await {
        Ok(released) => released,
        Err(err) if err.kind() == ErrorKind::Unsupported => {
            eprintln!("distlock: {err}");
            return Ok(ExitCode::from(EXIT_UNSUPPORTED));
        }
        Err(err) => return Err(err.into()),
    };
    if released.is_empty() {
        println!("'{}' was not held; nothing ended", args.key);
    }
    for holder in &released {
        let token = holder
            .token
            .map_or_else(|| "-".to_owned(), |token| token.to_string());
        println!(
            "ended {} hold of '{}' by {} (session {}, token {token}); its holder is told \
             it lost the lock, and the next grant's token is higher",
            holder.mode,
            shown(&args.key),
            shown(&holder.owner),
            shown(&holder.session),
        );
    }
    Ok(ExitCode::SUCCESS)
}
