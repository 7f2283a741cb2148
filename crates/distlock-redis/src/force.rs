//! Forced release: an operator ends every hold on a key, on every instance,
//! with one script each (`FORCE` in `scripts.rs`) that frees the key as a
//! release does, so the waiters at the head of the queue are handed it.
//!
//! - The next grant's token comes from `INCR` after the ended holds'
//!   (on Redlock, from a majority, which meets the majority that holds each
//!   ended token), so it is higher.
//! - An ended holder is not told: the hub subscribes only while a session
//!   waits, and a hold keeps no channel. Its next renewal (within a third of
//!   its lease) finds its member gone on a majority and reports the key
//!   lost; its release finds nothing and is refused.
//! - On Redlock a majority must run the script. With fewer, the holds on
//!   the instances reached are ended but the others stand, and the answer
//!   is an error that says to run it again.

use std::collections::HashMap;
use std::time::Duration;

use distlock_core::status::HolderStatus;
use distlock_core::store::Mode;
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;

use crate::instance::{Failures, Instance, CALL_TIMEOUT};
use crate::scripts::LockKeys;
use crate::status::{holders_of, owners_of, session_of, Hold, LockView};
use crate::{Shared, KEY_PREFIX};

/// What one instance ended: the holds, and their sessions' owners.
struct Ended {
    lock: LockView,
    owners: HashMap<String, String>,
}

/// Ends every hold on `key` on the instances of `shared`; what was held,
/// each hold once, with its owner where its session still has one written.
pub(crate) async fn force_release(
    shared: &Shared,
    key: &str,
    requested_by: &str,
) -> Result<Vec<HolderStatus>> {
    let keys = LockKeys::new(KEY_PREFIX, key);
    let instances = &shared.instances;
    let answers = join_all(instances.iter().map(|instance| end_holds(instance, &keys))).await;
    let mut reached = Vec::new();
    let mut failures = Failures::default();
    for (instance, answer) in instances.iter().zip(answers) {
        match answer {
            Ok(ended) => reached.push(ended),
            Err(err) => failures.push(instance, err),
        }
    }
    let locks: Vec<&LockView> = reached.iter().map(|ended| &ended.lock).collect();
    // Every hold ended on any instance is reported, not only those a
    // majority lists (as `status` does): a hold ended where it was reached
    // is lost all the same, even if a missed instance still has it.
    let holders: Vec<HolderStatus> = holders_of(&locks, instances.len(), shared.quorum, 1)
        .into_iter()
        .map(|(member, mut holder)| {
            let session = session_of(member);
            holder.owner = reached
                .iter()
                .find_map(|ended| ended.owners.get(session))
                .cloned()
                .unwrap_or_default();
            holder
        })
        .collect();
    let audit = Audit(&holders);
    if reached.len() < shared.quorum {
        tracing::warn!(
            key,
            requested_by,
            ended = holders.len(),
            holds = %audit,
            %failures,
            "forced release reached too few Redis instances"
        );
        return Err(failures.source_of(too_few(key, shared, reached.len(), &failures)));
    }
    tracing::warn!(
        key,
        requested_by,
        ended = holders.len(),
        holds = %audit,
        "forced release"
    );
    if failures.len() > 0 {
        tracing::warn!(
            key,
            %failures,
            "forced release missed some Redis instances; their holds end at the holders' \
             next renewal or with their leases"
        );
    }
    Ok(holders)
}

/// The ended holds, for an operator's audit: `OWNER (session S, MODE,
/// token T); …`, with what is not known said so.
struct Audit<'a>(&'a [HolderStatus]);

impl std::fmt::Display for Audit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, holder) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            match holder.owner.as_str() {
                "" => f.write_str("owner unknown")?,
                owner => write!(f, "{owner:?}")?,
            }
            write!(f, " (session {}, {}, ", holder.session, holder.mode.tag())?;
            match holder.token {
                Some(token) => write!(f, "token {token})")?,
                None => f.write_str("token unknown)")?,
            }
        }
        Ok(())
    }
}

/// The error of a forced release that only `reached` instances ran, too
/// few.
fn too_few(key: &str, shared: &Shared, reached: usize, failures: &Failures) -> Error {
    let instances = shared.instances.len();
    let message = if instances == 1 {
        let why = failures.on_single("check that redis-server runs there, then run it again", "");
        format!("cannot end the holds on '{key}': {why}")
    } else {
        format!(
            "the forced release of '{key}' reached only {reached} of {instances} Redlock \
             instances ({} needed): {failures}; the holds on those it reached are ended, the \
             others stand: run it again once a majority answers",
            shared.quorum
        )
    };
    Error::new(ErrorKind::Unavailable, message)
}

/// Runs the forced release on one instance, then reads the owners of the
/// sessions it ended. The owners are only for the report: a failure to
/// read them leaves them unknown, not the release failed.
async fn end_holds(instance: &Instance, keys: &LockKeys) -> redis::RedisResult<Ended> {
    let raw = instance.force_release(keys).await?;
    let holds: Vec<Hold> = raw
        .into_iter()
        .map(|(member, tag, token, lease_left)| Hold {
            mode: mode_of(&instance.name, &member, &tag),
            token: token.parse().ok(),
            lease_left: Duration::from_millis(u64::try_from(lease_left).unwrap_or(0)),
            member,
        })
        .collect();
    let owners = if holds.is_empty() {
        HashMap::new()
    } else {
        let members: Vec<&str> = holds.iter().map(|hold| hold.member.as_str()).collect();
        let read = instance.within(CALL_TIMEOUT, async {
            let mut connection = instance.connection().await?;
            owners_of(&mut connection, &members).await
        });
        read.await.unwrap_or_else(|err| {
            tracing::debug!(instance = %instance.name, "owners of a forced release: {err}");
            HashMap::new()
        })
    };
    Ok(Ended {
        lock: LockView::of_holds(holds),
        owners,
    })
}

/// The mode of an ended hold from the main key's tag. A tag that names no
/// mode (the scripts never leave a live hold under one) still ends a hold:
/// it is reported, as exclusive, and said so, not left out of the report.
fn mode_of(instance: &str, member: &str, tag: &str) -> Mode {
    Mode::from_tag(tag).unwrap_or_else(|| {
        tracing::warn!(
            instance,
            member,
            tag,
            "forced release ended a hold whose mode Redis does not say; reported as exclusive"
        );
        Mode::Exclusive
    })
}

#[cfg(test)]
mod tests {
    use distlock_core::status::HolderStatus;
    use distlock_core::Mode;

    use super::Audit;

    #[test]
    fn the_audit_names_each_ended_hold_once_and_what_is_not_known() {
        let hold = |owner: &str, session: &str, mode, token| HolderStatus {
            session: session.to_owned(),
            owner: owner.to_owned(),
            mode,
            token,
            held_for: None,
            lease_left: None,
        };
        let ended = [
            hold("billing-7", "s1", Mode::Exclusive, Some(41)),
            hold("", "s2", Mode::Shared, None),
        ];
        assert_eq!(
            Audit(&ended).to_string(),
            format!(
                "\"billing-7\" (session s1, {}, token 41); owner unknown (session s2, {}, token \
                 unknown)",
                Mode::Exclusive.tag(),
                Mode::Shared.tag()
            )
        );
        assert_eq!(Audit(&ended[..1]).to_string().matches(';').count(), 0);
    }
}
