//! The checker: reads the history and counts what must never happen.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::register::{Event, Kind};

/// What the history shows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    /// Grants.
    pub acquisitions: u64,
    /// Writes the register refused for a stale token.
    pub stale_refused: u64,
    /// Of those, writes whose guard still said it held the lock: the store
    /// had granted it to another meanwhile.
    pub refused_while_held: u64,
    /// Pairs of accepted writes whose holds (from grant to write) overlap.
    pub overlaps_accepted: u64,
    /// Grants whose token was not above the token of every hold that had
    /// ended before the grant was heard of (or equal to a token held now).
    pub token_regressions: u64,
    /// Losses reported after the lock was granted to another worker while
    /// the holder was still in its section (before its write).
    pub lost_late: u64,
    /// Losses reported at all.
    pub losses: u64,
}

/// Checks a history (in the order heard).
pub fn check(events: &[Event]) -> Findings {
    let mut findings = Findings::default();
    // The grant each worker's current hold started with.
    let mut holding: HashMap<u32, (u64, Instant)> = HashMap::new();
    // Accepted writes as (hold start, write time, token).
    let mut writes: Vec<(Instant, Instant, u64)> = Vec::new();
    // The highest token of a hold that has ended: reports of grants may
    // reach the register out of order, but none may come after a later
    // holder has released.
    let mut highest_ended = 0;
    // Grants in order, to find the next holder after a loss.
    let mut grants: Vec<(Instant, u32, u64)> = Vec::new();
    let mut losses: Vec<(Instant, u32, u64)> = Vec::new();
    // When each hold's section ended (its write, accepted or not), by
    // worker and token: after it, the worker only releases.
    let mut sections_ended: HashMap<(u32, u64), Instant> = HashMap::new();
    for event in events {
        if matches!(
            event.kind,
            Kind::Accepted | Kind::Refused | Kind::RefusedWhileHeld
        ) {
            sections_ended
                .entry((event.worker, event.token))
                .or_insert(event.at);
        }
        match event.kind {
            Kind::Acquired => {
                findings.acquisitions += 1;
                let duplicate = holding
                    .iter()
                    .any(|(worker, (token, _))| *worker != event.worker && *token == event.token);
                if event.token <= highest_ended || duplicate {
                    findings.token_regressions += 1;
                }
                holding.insert(event.worker, (event.token, event.at));
                grants.push((event.at, event.worker, event.token));
            }
            Kind::Accepted => {
                if let Some(&(token, start)) = holding.get(&event.worker) {
                    if token == event.token {
                        writes.push((start, event.at, token));
                    }
                }
            }
            Kind::Refused => findings.stale_refused += 1,
            Kind::RefusedWhileHeld => {
                findings.stale_refused += 1;
                findings.refused_while_held += 1;
            }
            Kind::Lost => {
                findings.losses += 1;
                losses.push((event.at, event.worker, event.token));
            }
            Kind::Released => {
                if holding
                    .get(&event.worker)
                    .is_some_and(|(token, _)| *token == event.token)
                {
                    holding.remove(&event.worker);
                    highest_ended = highest_ended.max(event.token);
                }
            }
            Kind::Trying | Kind::Failed => {}
        }
    }
    // Overlapping holds among accepted writes: sorted by start, a write
    // overlaps an earlier one that ends after it starts.
    writes.sort_by_key(|(start, _, _)| *start);
    let mut latest_end: Option<(Instant, u64)> = None;
    for (start, end, token) in writes {
        if let Some((end_before, token_before)) = latest_end {
            if start < end_before && token != token_before {
                findings.overlaps_accepted += 1;
            }
        }
        if latest_end.is_none_or(|(end_before, _)| end > end_before) {
            latest_end = Some((end, token));
        }
    }
    // A loss must be known before the next grant to another worker, unless
    // the holder's section had already ended by then: a release that
    // reached the store hands the key on before its answer (and so the
    // holder's deadline, if the answer is slow) comes back.
    for (at, worker, token) in losses {
        let next = grants
            .iter()
            .find(|(_, other, granted)| *other != worker && *granted > token);
        let Some(&(granted_at, _, _)) = next else {
            continue;
        };
        let ended_first = sections_ended
            .get(&(worker, token))
            .is_some_and(|ended| *ended <= granted_at);
        if granted_at < at && !ended_first {
            findings.lost_late += 1;
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn event(at: Instant, worker: u32, kind: Kind, token: u64) -> Event {
        Event {
            at,
            worker,
            pid: worker,
            kind,
            token,
        }
    }

    #[test]
    fn overlapping_accepted_writes_and_backward_tokens_are_found() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let history = [
            event(ms(0), 1, Kind::Acquired, 5),
            // Worker 1 pauses; its lease runs out; worker 2 gets the lock.
            event(ms(10), 2, Kind::Acquired, 6),
            event(ms(11), 2, Kind::Accepted, 6),
            event(ms(12), 2, Kind::Released, 6),
            // Worker 1 wakes and writes: accepted only without fencing.
            event(ms(20), 1, Kind::Accepted, 5),
            event(ms(21), 1, Kind::Lost, 5),
            // A token below one whose hold has ended.
            event(ms(30), 3, Kind::Acquired, 4),
        ];
        let findings = check(&history);
        assert_eq!(findings.acquisitions, 3);
        assert_eq!(findings.overlaps_accepted, 1);
        assert_eq!(findings.token_regressions, 1);
        assert_eq!(findings.lost_late, 1);
    }

    #[test]
    fn late_reports_are_not_regressions_but_a_refused_holder_is_caught() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let history = [
            // Granted 5 then 6, heard in the other order: no hold had ended.
            event(ms(0), 2, Kind::Acquired, 6),
            event(ms(1), 1, Kind::Acquired, 5),
            // A write refused while its guard said it held: two holders.
            event(ms(2), 1, Kind::RefusedWhileHeld, 5),
        ];
        let findings = check(&history);
        assert_eq!(findings.token_regressions, 0);
        assert_eq!(findings.refused_while_held, 1);
        assert_eq!(findings.stale_refused, 1);
    }

    #[test]
    fn a_loss_heard_while_releasing_after_the_section_is_not_late() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let history = [
            event(ms(0), 1, Kind::Acquired, 5),
            event(ms(5), 1, Kind::Accepted, 5),
            // Worker 1's release hands the key on; its answer is slow, and
            // worker 1's deadline passes before it comes.
            event(ms(10), 2, Kind::Acquired, 6),
            event(ms(12), 1, Kind::Lost, 5),
            event(ms(13), 1, Kind::Released, 5),
            // Worker 3 is granted while worker 2 is still in its section,
            // and worker 2 hears of its loss only afterwards: late.
            event(ms(20), 3, Kind::Acquired, 7),
            event(ms(21), 2, Kind::Lost, 6),
            event(ms(22), 2, Kind::Refused, 6),
        ];
        let findings = check(&history);
        assert_eq!(findings.lost_late, 1);
    }

    #[test]
    fn a_fenced_history_is_clean() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let history = [
            event(ms(0), 1, Kind::Acquired, 5),
            event(ms(5), 1, Kind::Lost, 5),
            event(ms(10), 2, Kind::Acquired, 6),
            event(ms(11), 2, Kind::Accepted, 6),
            event(ms(20), 1, Kind::Refused, 5),
            event(ms(30), 3, Kind::Acquired, 7),
            event(ms(31), 3, Kind::Accepted, 7),
        ];
        let findings = check(&history);
        assert_eq!(
            findings,
            Findings {
                acquisitions: 3,
                stale_refused: 1,
                losses: 1,
                ..Findings::default()
            }
        );
    }
}
